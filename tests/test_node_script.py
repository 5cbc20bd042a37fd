"""slurm/gonka_node.sh outside Slurm: its settings, its share of the spools, and its signals.

The script runs for real under bash; the Slurm variables an array task gets are set by hand,
and the worker is a stand-in (a bash script that records its arguments, then exits as told,
or sleeps) so each case takes well under a second. `tests/test_slurm_node.py` runs the same
script under the local Slurm with the real worker.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gonka_hpc.identity import load_or_create

SCRIPT = Path(__file__).resolve().parents[1] / "slurm" / "gonka_node.sh"

FAKE_PYTHON = f"""#!/usr/bin/env bash
# `python -c ...` (the script's import check) is the real python; a worker records its
# arguments, one [word] each, then does what FAKE_WORKER says.
if [ "$1" = "-c" ]; then exec {sys.executable} "$@"; fi
line=""; for a in "$@"; do line+="[$a]"; done; echo "$line" >> "$FAKE_LOG"
case "${{FAKE_WORKER:-ok}}" in
  ok) exit 0 ;;
  preempted) exit 75 ;;
  sleep) exec sleep 30 ;;
esac
"""


@pytest.fixture()
def site(tmp_path: Path) -> Path:
    """Spools a, b, c with their keys, an inbox, a stand-in python and a stub scontrol."""
    for name in "abc":
        (tmp_path / "spool" / name).mkdir(parents=True)
        load_or_create(tmp_path / "keys" / f"{name}.key", name)
    (tmp_path / "inbox").mkdir()
    py = tmp_path / "fakepy"
    py.write_text(FAKE_PYTHON)
    py.chmod(0o755)
    (tmp_path / "bin").mkdir()
    stub = tmp_path / "bin" / "scontrol"
    stub.write_text(f'#!/bin/sh\necho "scontrol $*" >> {tmp_path}/scontrol.log\n')
    stub.chmod(0o755)
    return tmp_path


def _env(site: Path, **env: str) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("SLURM_", "GONKA_"))}
    return {**clean, "PATH": f"{site / 'bin'}:{os.environ['PATH']}",
            "GONKA_PYTHON": str(site / "fakepy"), "FAKE_LOG": str(site / "worker.log"),
            "GONKA_REQUEUE_WAIT": "0", **env}


def run(site: Path, **env: str) -> tuple[int, str, list[str]]:
    """(exit code, the script's log, one line of [args] per worker started)."""
    res = subprocess.run(["bash", str(SCRIPT)], cwd=site, env=_env(site, **env),
                         capture_output=True, text=True, timeout=60, check=False)
    log = site / "worker.log"
    workers = log.read_text().splitlines() if log.exists() else []
    log.unlink(missing_ok=True)
    return res.returncode, res.stdout + res.stderr, workers


def _spools(workers: list[str]) -> list[str]:
    return [Path(w.split("[--spool][")[1].split("]")[0]).name for w in workers]


def _array(task: int, count: int, first: int = 0, step: int = 1) -> dict[str, str]:
    return {"SLURM_ARRAY_JOB_ID": "7", "SLURM_ARRAY_TASK_ID": str(task),
            "SLURM_ARRAY_TASK_COUNT": str(count), "SLURM_ARRAY_TASK_MIN": str(first),
            "SLURM_ARRAY_TASK_MAX": str(first + (count - 1) * step),
            "SLURM_ARRAY_TASK_STEP": str(step)}


def test_gres_gpus_become_the_tensor_parallel_size(site: Path) -> None:
    """--gres=gpu:N sets SLURM_GPUS_ON_NODE=N in the task; the script turns it into the
    engine's tensor parallel size unless the admin set one."""
    def tp_line(**env: str) -> str:
        rc, log, _ = run(site, **env)
        assert rc == 0, log
        return next(x for x in log.splitlines() if "tensor parallel size" in x)

    assert "tensor parallel size 4 (GPUs on this node: 4)" in tp_line(SLURM_GPUS_ON_NODE="4")
    assert "tensor parallel size 2 " in tp_line(SLURM_GPUS_ON_NODE="4",
                                                GONKA_TENSOR_PARALLEL_SIZE="2")
    assert "tensor parallel size 1 (GPUs on this node: none)" in tp_line()


def test_node_args_split_like_shell_words(site: Path) -> None:
    rc, log, workers = run(site, GONKA_NODE_ARGS="--data-dir '/x y/z' --batch-size 4")
    assert rc == 0, log
    assert len(workers) == 3 and all(w.endswith("[--data-dir][/x y/z][--batch-size][4]")
                                     for w in workers), workers
    rc, log, workers = run(site, GONKA_NODE_ARGS='--data-dir "/x y')
    assert rc == 2 and "ERROR GONKA_NODE_ARGS=" in log and not workers


@pytest.mark.parametrize("array, spools", [
    ([_array(0, 2), _array(1, 2)], [["a", "c"], ["b"]]),
    ([_array(1, 2, first=1), _array(2, 2, first=1)], [["a", "c"], ["b"]]),  # --array=1-2
    ([_array(0, 2, step=2), _array(2, 2, step=2)], [["a", "c"], ["b"]]),  # --array=0-2:2
    ([_array(0, 3), _array(1, 3), _array(2, 3)], [["a"], ["b"], ["c"]]),
])
def test_each_task_runs_its_share_whatever_the_array_ids(site: Path, array: list[dict[str, str]],
                                                         spools: list[list[str]]) -> None:
    for env, want in zip(array, spools, strict=True):
        rc, log, workers = run(site, **env)
        assert rc == 0, log
        assert _spools(workers) == want, log


def test_a_rerun_task_needs_the_number_of_shares(site: Path) -> None:
    """`sbatch --array=1` to re-run task 1 of a 2-task array: without GONKA_SHARES the
    script cannot know its share, and running every spool would duplicate the others' work."""
    rc, log, workers = run(site, **_array(1, 1, first=1))
    assert rc == 2 and "set GONKA_SHARES" in log and not workers
    rc, log, workers = run(site, GONKA_SHARES="2", **_array(1, 1, first=1))
    assert rc == 0 and _spools(workers) == ["b"], log
    rc, log, workers = run(site, GONKA_SHARES="2", **_array(2, 1, first=2))
    assert rc == 2 and "beyond the 2 share(s)" in log and not workers
    irregular = {**_array(3, 3, first=1), "SLURM_ARRAY_TASK_MAX": "7"}  # --array=1,3,7
    rc, log, workers = run(site, **irregular)
    assert rc == 2 and "not an evenly spaced range" in log and not workers


def test_every_setting_is_checked_before_the_first_worker(site: Path) -> None:
    (site / "keys" / "c.key").unlink()  # the last spool's: found before a and b run
    rc, log, workers = run(site)
    assert rc == 2 and "spool " in log and "c.key" in log and not workers
    load_or_create(site / "keys" / "c.key", "c")
    (site / "empty").mkdir()
    for env, message in (
            ({"GONKA_SPOOL_ROOT": str(site / "empty")}, "holds no spool directory"),
            ({"GONKA_SPOOL_LIST": str(site / "spool")}, "is not a readable file"),
            ({"GONKA_INBOX": str(site / "nowhere")}, "GONKA_INBOX="),
            ({"GONKA_PYTHON": str(site / "no-python")}, "cannot import gonka_hpc"),
            ({"GONKA_REQUEUE_WAIT": "soon"}, "GONKA_REQUEUE_WAIT=soon")):
        rc, log, workers = run(site, **env)
        assert rc == 2 and message in log and not workers, (env, log)


def test_a_spool_list_ignores_blanks_comments_and_carriage_returns(site: Path) -> None:
    listing = site / "spools.txt"
    listing.write_bytes(b"  # the site's spools\n spool/c \r\n\nspool/a\r\n\t\n")
    rc, log, workers = run(site, GONKA_SPOOL_LIST=str(listing))
    assert rc == 0 and _spools(workers) == ["c", "a"], log
    listing.write_text("# nothing\n")
    rc, log, workers = run(site, GONKA_SPOOL_LIST=str(listing))
    assert rc == 2 and "lists no spool" in log


def test_a_spool_another_task_runs_is_skipped(site: Path) -> None:
    holder = subprocess.Popen(["flock", str(site / "spool" / "b" / ".gonka-node.lock"),
                               "sleep", "30"])
    try:
        deadline = time.monotonic() + 10
        while subprocess.run(["flock", "-n", str(site / "spool" / "b" / ".gonka-node.lock"),
                              "true"], check=False).returncode == 0:
            assert time.monotonic() < deadline, "the holder never took the lock"
            time.sleep(0.05)
        rc, log, workers = run(site)
    finally:
        holder.kill()
        holder.wait()
    assert rc == 0 and _spools(workers) == ["a", "c"], log
    assert "spool b is being run by another task" in log


def test_usr2_while_the_worker_starts_is_a_requeue(site: Path) -> None:
    """A worker killed by the forwarded USR2 before it installed its handler did nothing yet:
    requeue, as after a checkpoint (it used to end the task with 140, the rest unrun)."""
    proc = subprocess.Popen(["bash", str(SCRIPT)], cwd=site, env=_env(
        site, FAKE_WORKER="sleep", **_array(0, 1)), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 20
    while not (site / "worker.log").exists():
        assert time.monotonic() < deadline, "no worker started"
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR2)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "still starting" in out and "requeueing 7_0" in out
    assert (site / "scontrol.log").read_text().split() == ["scontrol", "requeue", "7_0"]


def test_a_worker_stopped_by_a_signal_of_its_own_is_requeued(site: Path) -> None:
    rc, log, workers = run(site, FAKE_WORKER="preempted", **_array(0, 1))
    assert rc == 0 and len(workers) == 1, log  # b and c are left for the requeued run
    assert "signal this script did not get: requeueing" in log
    assert (site / "scontrol.log").read_text().split() == ["scontrol", "requeue", "7_0"]


@pytest.mark.parametrize("env, args", [
    (_array(2, 2, first=1), "[--task][1][--tasks][2]"),  # --array=1-2
    (_array(4, 3, step=2), "[--task][2][--tasks][3]"),  # --array=0-4:2
    ({"GONKA_SHARES": "4", **_array(3, 1, first=3)}, "[--task][3][--tasks][4]"),
    (_array(3, 1, first=3), None),  # a re-run of one task without GONKA_SHARES
])
def test_verify_script_shares_follow_the_array(site: Path, env: dict[str, str],
                                               args: str | None) -> None:
    """slurm/gonka_verify.sh maps the array task to the same shares as the node script."""
    res = subprocess.run(["bash", str(SCRIPT.parent / "gonka_verify.sh")], cwd=site,
                         env=_env(site, GONKA_EPOCH_DIR=str(site), **env),
                         capture_output=True, text=True, timeout=60, check=False)
    log = site / "worker.log"
    worker = log.read_text() if log.exists() else ""
    if args is None:
        assert res.returncode == 2 and "set GONKA_SHARES" in res.stdout and not worker
    else:
        assert res.returncode == 0, res.stdout + res.stderr
        assert worker.strip().endswith(args), worker
