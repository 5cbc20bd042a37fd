"""slurm/gonka_validators.sh on the real local Slurm: 4 validators as one `srun --mpi=pmi2` job.

The job must come up as ONE 4-rank MPI world (the ledger asserts the size, so a wrong launcher
fails instead of starting 4 single-rank worlds), finalize records posted to its inbox, stop
cleanly on STOP, and leave 4 byte-identical chains that pass the offline audit; `sacct` must
show the job COMPLETED. Waits poll, scaled by GONKA_TIMEOUT_SCALE.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_slurm_node import sh, slurm, wait_until  # noqa: F401  (slurm: the session fixture)

from gonka_hpc.inbox import post
from ledger.__main__ import main as ledger_main
from ledger.chain import CHAIN_FILE, find_records
from ledger.testkit import World

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "slurm" / "gonka_validators.sh"


def final_state(job: str) -> str | None:
    """The job's state once squeue has let go of it and accounting has recorded its end
    (slurmdbd can lag: a finished job may still read PENDING or RUNNING for a moment)."""
    if sh("squeue", "-h", "-j", job).strip():
        return None
    states = sh("sacct", "-j", job, "-X", "-n", "-P", "-o", "State").split()
    if len(states) != 1 or states[0] in ("PENDING", "RUNNING", "REQUEUED"):
        return None
    return states[0]


def test_validators_run_as_one_srun_pmi2_job(slurm: str, tmp_path: Path) -> None:  # noqa: F811
    world = World(n_validators=4, clients={"alice": 1_000_000})
    (tmp_path / "genesis.json").write_text(json.dumps(world.genesis))
    world.save_validator_keys(tmp_path / "keys")
    (tmp_path / "logs").mkdir()
    env = {**os.environ, "GONKA_PYTHON": sys.executable, "PYTHONPATH": str(REPO),
           "GONKA_LEDGER_ARGS": "--interval 0.02"}
    res = subprocess.run(["sbatch", "--parsable", "--ntasks=4", str(SCRIPT)], cwd=tmp_path,
                         env=env, capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
    job = res.stdout.strip().split(";")[0]
    log = tmp_path / "logs" / f"gonka-validators-{job}.out"
    inbox, chain0 = tmp_path / "inbox", tmp_path / "ledger" / "validator-0"
    wait_until(inbox.is_dir, 60, "the job to start")
    ids = [post(inbox, world.join(f"site-{i}")) for i in range(5)]

    def final() -> bool:
        return (chain0 / CHAIN_FILE).exists() and len(find_records(chain0, ids)) == len(ids)

    wait_until(final, 60, f"5 records final (log: {log})")
    (inbox / "STOP").touch()
    state = wait_until(lambda: final_state(job), 60, "the job's end in sacct")
    text = log.read_text()
    assert state == "COMPLETED", text
    assert "4 ranks" in text
    assert "UCX_TLS=self,sm" in text  # one node: shared memory only (see the script)
    dirs = [tmp_path / "ledger" / f"validator-{i}" for i in range(4)]
    chains = [(d / CHAIN_FILE).read_bytes() for d in dirs]
    assert chains[0] and len(set(chains)) == 1
    assert ledger_main(["verify-chain", *map(str, dirs)]) == 0


def test_too_few_tasks_fail_loudly(slurm: str, tmp_path: Path) -> None:  # noqa: F811
    """2 ranks for a 4-validator genesis: the job fails; it never runs as a smaller network."""
    world = World(n_validators=4, clients={"alice": 1_000_000})
    (tmp_path / "genesis.json").write_text(json.dumps(world.genesis))
    world.save_validator_keys(tmp_path / "keys")
    (tmp_path / "logs").mkdir()
    env = {**os.environ, "GONKA_PYTHON": sys.executable, "PYTHONPATH": str(REPO)}
    res = subprocess.run(["sbatch", "--parsable", "--ntasks=2", str(SCRIPT)], cwd=tmp_path,
                         env=env, capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
    job = res.stdout.strip().split(";")[0]
    # slurmctld's own record (sacct, fed asynchronously by slurmdbd, can lag behind a job
    # that fails within a second of starting)
    def ctld_state() -> str | None:
        out = sh("scontrol", "-o", "show", "job", job)
        state = out.split("JobState=")[1].split()[0] if "JobState=" in out else None
        return state if state not in (None, "PENDING", "RUNNING", "COMPLETING") else None

    assert wait_until(ctld_state, 60, "the job's end in scontrol") == "FAILED"

    def ranks_left() -> list[int]:  # no rank may survive its failed job (spinning in MPI)
        mark = str(tmp_path / "genesis.json").encode()
        return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()
                and mark in _cmdline(p)]

    wait_until(lambda: not ranks_left(), 30, "every rank of the failed job to exit")
    assert not (tmp_path / "ledger" / "validator-0" / CHAIN_FILE).exists() or not \
        (tmp_path / "ledger" / "validator-0" / CHAIN_FILE).read_bytes()


def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:
        return b""
