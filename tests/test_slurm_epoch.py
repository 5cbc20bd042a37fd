"""`gonka-hpc epoch schedule|status` on the real local Slurm (slurm/dev_cluster.sh).

- A whole epoch, scheduled as six jobs chained with --dependency, in an epoch dir whose path
  holds spaces and quotes, reaches settlement: outputs for every line, verdicts, rewards, four
  identical audited chains; `epoch status` and `sacct` show every stage COMPLETED and the
  teardown cancelled as never needed.
- A failing stage (the ML nodes, given a flag `gonka-hpc node` does not know) makes Slurm
  cancel every stage after it; the teardown job runs and stops the validators; `epoch status`
  names the failed stage, its exit code and its log, and says why the others were cancelled.
- The generated batch scripts match a golden file, for a config full of hostile paths, and
  bash reads every path back exactly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_slurm_node import sh, slurm, wait_until  # noqa: F401  (slurm: the session fixture)

from gonka_hpc.cli.main import main
from gonka_hpc.slurm_epoch import EpochLayout, SlurmSettings, render_scripts
from ledger.audit import compare_dirs

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "golden" / "epoch_sbatch.txt"
HOSTILE = "ep och/it's \"quoted\" $HOME `x`"


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gonka_hpc.cli.main", *args],
                          capture_output=True, text=True, check=False, timeout=300)


def jobs_of(d: Path) -> dict[str, str]:
    return json.loads((d / "jobs.json").read_text())


def all_ended(d: Path) -> bool:
    """No stage of the epoch left in slurmctld's queue."""
    return not sh("squeue", "-h", "-j", ",".join(jobs_of(d).values())).strip()


def sacct_final(d: Path) -> dict[str, str] | None:
    """Stage -> state from slurmdbd, once it has recorded every stage's end (it lags)."""
    out: dict[str, str] = {}
    for stage, jid in jobs_of(d).items():
        states = {line.split("|")[1].split()[0] for line in sh(
            "sacct", "-j", jid, "-X", "-n", "-P", "-o", "JobID,State").splitlines() if line}
        if not states or states & {"PENDING", "RUNNING", "REQUEUED"}:
            return None
        out[stage] = "/".join(sorted(states))
    return out


@pytest.mark.slurm
def test_scheduled_epoch_reaches_settlement(slurm: str, tmp_path: Path,  # noqa: F811
                                            model_home: Path) -> None:
    d = tmp_path / HOSTILE
    res = run_cli("epoch", "schedule", str(REPO / "jobs" / "quickstart.jsonl"), "--dir", str(d),
                  "--nodes", "2", "--node-args=--batch-size 8")
    assert res.returncode == 0, res.stderr
    jobs = jobs_of(d)
    assert list(jobs) == ["validators", "assign", "nodes", "finalize", "verify", "settle",
                          "teardown"]
    for stage, jid in jobs.items():
        assert f"{stage:<11} {jid}" in res.stdout
    wait_until(lambda: all_ended(d), 240, "the epoch's jobs to end")

    status = run_cli("epoch", "status", "--dir", str(d))
    assert status.returncode == 0, status.stdout + status.stderr
    for stage in ("validators", "assign", "nodes", "finalize", "verify", "settle"):
        assert f"{stage:<11} {jobs[stage]:<9} COMPLETED" in status.stdout, status.stdout
    assert "not needed: no stage failed" in status.stdout
    assert "4 validator chains identical and verified" in status.stdout

    summary = json.loads((d / "summary.json").read_text())
    lines = (d / "outputs" / "job.output.jsonl").read_text().splitlines()
    assert len(lines) == summary["requests"] == 16 and summary["answered"] == 14
    assert summary["inferences_verified"] == 14
    assert all(v["passed"] for v in summary["verdicts"]) and not summary["forfeited"]
    assert sum(summary["balances"].values()) == summary["total_supply"]
    dirs = sorted((d / "ledger").glob("validator-*"))
    assert len(dirs) == 4 and compare_dirs(dirs) == []
    # both node tasks ran, each its share of the three spools
    logs = sorted((d / "logs").glob(f"gonka-e1-nodes-{jobs['nodes']}_*.out"))
    assert len(logs) == 2 and all("all shares done" in p.read_text() for p in logs)

    states = wait_until(lambda: sacct_final(d), 60, "sacct to record every stage")
    assert states == {**{s: "COMPLETED" for s in jobs if s != "teardown"},
                      "teardown": "CANCELLED"}, states


@pytest.mark.slurm
def test_scheduled_epoch_catches_cheating_executors(slurm: str, tmp_path: Path,  # noqa: F811
                                                    model_home: Path) -> None:
    """Every ML node runs the pre-fill attack: the verify stage fails their batches, the
    settle stage runs the dispute panels, and settlement forfeits and refunds."""
    d = tmp_path / "epoch"
    res = run_cli("epoch", "schedule", str(REPO / "jobs" / "quickstart.jsonl"), "--dir", str(d),
                  "--node-args=--cheat-with gonka-tiny-small")
    assert res.returncode == 0, res.stderr
    wait_until(lambda: all_ended(d), 240, "the epoch's jobs to end")
    status = run_cli("epoch", "status", "--dir", str(d))
    assert status.returncode == 0, status.stdout + status.stderr
    summary = json.loads((d / "summary.json").read_text())
    executors = sorted(v["executor"] for v in summary["verdicts"])
    assert executors and not any(v["passed"] for v in summary["verdicts"]), summary["verdicts"]
    assert sorted(summary["forfeited"]) == executors
    assert summary["refunds"].get("alice", 0) > 0
    assert not set(summary["rewards"]) & set(executors), summary["rewards"]
    assert sum(summary["balances"].values()) == summary["total_supply"]
    assert "FORFEIT" in status.stdout


@pytest.mark.slurm
def test_failed_stage_cancels_its_dependents(slurm: str, tmp_path: Path,  # noqa: F811
                                             model_home: Path) -> None:
    d = tmp_path / "epoch"
    # schedule refuses node flags the node's parser rejects, so the nodes stage is made to
    # fail at run time: a flag it accepts, naming a model that does not exist
    res = run_cli("epoch", "schedule", str(REPO / "jobs" / "quickstart.jsonl"), "--dir", str(d),
                  "--node-args=--cheat-with no-such-model")
    assert res.returncode == 0, res.stderr
    jobs = jobs_of(d)
    wait_until(lambda: all_ended(d), 180, "the epoch's jobs to end")

    status = run_cli("epoch", "status", "--dir", str(d))
    assert status.returncode == 2, status.stdout + status.stderr
    rows = {line.split()[0]: line for line in status.stdout.splitlines()[1:] if line.strip()}
    assert "COMPLETED" in rows["assign"] and "COMPLETED" in rows["validators"], status.stdout
    assert "FAILED" in rows["nodes"] and "exit code 2:0" in rows["nodes"], rows["nodes"]
    log = rows["nodes"].split("see ", 1)[1]
    assert "unknown model 'no-such-model'" in Path(log).read_text()
    for stage in ("finalize", "verify", "settle"):
        assert "CANCELLED" in rows[stage], rows[stage]
        assert "stage 'nodes' failed before it" in rows[stage], rows[stage]
    # the teardown ran and stopped the validators, which exited cleanly
    assert "COMPLETED" in rows["teardown"] and "stopped the validators" in rows["teardown"]
    assert (d / "inbox" / "STOP").exists()
    assert not (d / "summary.json").exists()

    as_json = json.loads(run_cli("epoch", "status", "--dir", str(d), "--json").stdout)
    assert {s["stage"]: s["job_id"] for s in as_json} == jobs
    states = wait_until(lambda: sacct_final(d), 60, "sacct to record every stage")
    assert states == {"validators": "COMPLETED", "assign": "COMPLETED", "nodes": "FAILED",
                      "finalize": "CANCELLED", "verify": "CANCELLED", "settle": "CANCELLED",
                      "teardown": "COMPLETED"}, states


@pytest.mark.slurm
def test_cancel_stops_every_stage(slurm: str, tmp_path: Path,  # noqa: F811
                                  model_home: Path) -> None:
    d = tmp_path / "epoch"
    assert run_cli("epoch", "schedule", str(REPO / "jobs" / "quickstart.jsonl"), "--dir",
                   str(d)).returncode == 0
    res = run_cli("epoch", "cancel", "--dir", str(d))
    assert res.returncode == 0 and "cancelled validators" in res.stdout, res.stdout + res.stderr
    wait_until(lambda: all_ended(d), 60, "the cancelled jobs to end")
    status = run_cli("epoch", "status", "--dir", str(d))
    assert status.returncode == 2, status.stdout
    rows = [line.split() for line in status.stdout.splitlines()[1:] if line.strip()]
    assert all(r[2] == "CANCELLED" for r in rows if r[0] != "validators"), status.stdout
    again = run_cli("epoch", "cancel", "--dir", str(d))
    assert again.returncode == 0 and "nothing to cancel" in again.stdout


# --- no Slurm needed below ---------------------------------------------------------------


def _hostile_layout() -> tuple[EpochLayout, SlurmSettings]:
    root = Path("/scratch/gonka hpc") / HOSTILE
    lay = EpochLayout(root / "e1", Path("/opt/gonka's tools/slurm"),
                      Path("/opt/gonka's tools/.venv/bin/python"), root / "models", "gonka-tiny",
                      1)
    st = SlurmSettings(partition="cpu", account="phys-123", node_partition="gpu",
                       node_qos="preemptible", node_tasks=4,
                       node_gres="gpu:4", node_cpus=8, node_time="02:00:00", verify_tasks=2,
                       validators=4, node_args="--engine vllm --batch-size 64")
    return lay, st


def test_sbatch_scripts_match_golden_file_with_hostile_paths() -> None:
    lay, st = _hostile_layout()
    scripts = render_scripts(lay, st)
    text = "".join(f"==> {name}.sbatch <==\n{body}" for name, body in scripts.items())
    if os.environ.get("GONKA_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text(), "scripts changed: rerun with GONKA_UPDATE_GOLDEN=1 " \
        "and review the diff of tests/golden/epoch_sbatch.txt"


def test_bash_reads_every_hostile_path_back_exactly(tmp_path: Path) -> None:
    lay, st = _hostile_layout()
    for name, body in render_scripts(lay, st).items():
        exports = [line for line in body.splitlines() if line.startswith("export ")]
        script = "\n".join(exports) + "\nenv -0\n"
        res = subprocess.run(["bash", "-c", script], capture_output=True, check=True,
                             env={"PATH": os.environ["PATH"]})
        env = dict(x.split("=", 1) for x in res.stdout.decode().split("\0") if "=" in x)
        assert env["GONKA_EPOCH_DIR"] == str(lay.dir), name
        assert env["GONKA_PYTHON"] == str(lay.python), name
        assert env["GONKA_HOME"] == str(lay.gonka_home), name
        assert env["GONKA_INBOX"] == str(lay.dir / "inbox"), name
        assert subprocess.run(["bash", "-n"], input=body.encode(), check=False).returncode == 0
        sbatch_lines = [x for x in body.splitlines() if x.startswith("#SBATCH")]
        assert not any(str(lay.dir) in x for x in sbatch_lines), "paths stay out of #SBATCH"


def test_schedule_refuses_bad_input_before_submitting(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "missing.jsonl"
    d = tmp_path / "e"
    with pytest.raises(SystemExit) as exc:
        main(["epoch", "schedule", str(bad), "--dir", str(d), "--dry-run"])
    assert exc.value.code == 2
    assert not d.exists(), "nothing is laid out for a job file that cannot be read"
    with pytest.raises(SystemExit) as exc:
        main(["epoch", "schedule", str(REPO / "jobs" / "quickstart.jsonl"), "--dir", str(d),
              "--nodes", "0", "--dry-run"])
    assert exc.value.code == 2 and "--nodes must be at least 1" in capsys.readouterr().err
    for cmd in ("status", "cancel"):
        with pytest.raises(SystemExit) as exc:
            main(["epoch", cmd, "--dir", str(tmp_path / "nowhere")])
        assert exc.value.code == 2 and "was this epoch scheduled" in capsys.readouterr().err
