"""slurm/gonka_node.sh on the real local Slurm (slurm/dev_cluster.sh): an array, and preemption.

An array of 2 tasks over 3 executor spools (2 jobs spooled by the real TA) runs every shard,
each task taking its share. A preemption test interrupts one shard twice mid-way: once with
`scontrol requeue` (Slurm's TERM to the job), once with USR2 to the batch script (as
`--signal=B:USR2@120` does), after which the script requeues itself; `StartTime=now` skips the
requeue's BeginTime wait. Then every request must be answered exactly once, the artifact must
verify, the restarts must have reused the checkpoint, and `sacct` must show the REQUEUED runs
and the final COMPLETED one. All waits poll, scaled by GONKA_TIMEOUT_SCALE.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from spoolkit import Site, check_exactly_once, make_site

from gonka_hpc.engines.reference import ReferenceEngine

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
DEV_CLUSTER = REPO / "slurm" / "dev_cluster.sh"
NODE_SCRIPT = REPO / "slurm" / "gonka_node.sh"
SCALE = float(os.environ.get("GONKA_TIMEOUT_SCALE", "1"))


def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout * SCALE
    while True:
        got = predicate()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout * SCALE:.0f}s waiting for {what}")
        time.sleep(0.05)


def sh(*cmd: str, check: bool = True) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=60 * SCALE)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr}")
    return res.stdout


@pytest.fixture(scope="session")
def slurm() -> Iterator[str]:
    """The local Slurm; started here (and stopped after) unless it already runs. Missing
    binaries fail the tests with the apt-get line to run: Slurm tests never skip."""
    conf = os.environ.get("SLURM_CONF") or sh(str(DEV_CLUSTER), "env").split("=", 1)[1].strip()
    os.environ["SLURM_CONF"] = conf
    running = subprocess.run([str(DEV_CLUSTER), "status"], capture_output=True,
                             check=False).returncode == 0
    if not running:
        res = subprocess.run([str(DEV_CLUSTER), "start"], capture_output=True, text=True,
                             check=False)
        if res.returncode != 0:
            pytest.fail(f"cannot start the local Slurm: {res.stderr.strip()}", pytrace=False)
    yield conf
    if not running:
        subprocess.run([str(DEV_CLUSTER), "stop"], capture_output=True, check=False)


@pytest.fixture(scope="module")
def engine(tiny_model) -> ReferenceEngine:  # type: ignore[no-untyped-def]
    return ReferenceEngine(tiny_model.path, k=5, model_hash=tiny_model.content_hash)


def submit(site: Site, model_home: Path, *args: str, node_args: str) -> str:
    (site.root / "logs").mkdir(exist_ok=True)
    env = {**os.environ, "GONKA_SPOOL_ROOT": str(site.spool_root),
           "GONKA_KEY_DIR": str(site.root / "keys"), "GONKA_INBOX": str(site.inbox),
           "GONKA_HOME": str(model_home), "GONKA_PYTHON": sys.executable,
           "GONKA_NODE_ARGS": node_args}
    res = subprocess.run(["sbatch", "--parsable", *args, str(NODE_SCRIPT)], cwd=site.root,
                         env=env, capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip().split(";")[0]


def sacct_states(job: str) -> list[tuple[str, str]]:
    """(JobID, State) of every run of the job's tasks, requeued runs included (-D)."""
    out = sh("sacct", "-j", job, "-D", "-X", "-n", "-P", "-o", "JobID,State")
    return [tuple(x.split("|")[:2]) for x in out.splitlines() if x]  # type: ignore[misc]


def finished(job: str, n_tasks: int) -> bool:
    if sh("squeue", "-h", "-j", job).strip():
        return False
    final = [s for _, s in sacct_states(job) if s != "REQUEUED"]
    return len(final) == n_tasks and all(s not in ("PENDING", "RUNNING") for s in final)


def log_of(site: Site, job: str, task: int) -> str:
    """The task's log ('' until slurmd creates it)."""
    path = site.root / "logs" / f"gonka-node-{job}_{task}.out"
    return path.read_text() if path.exists() else ""


def test_array_runs_every_shard_each_task_its_share(slurm: str, tmp_path: Path,
                                                    engine: ReferenceEngine,
                                                    model_home: Path) -> None:
    site = make_site(tmp_path, engine, executors=("n0", "n1", "n2"), jobs=2, requests=6,
                     max_tokens=8)
    assert len({s.executor for s in site.shards}) == 3 and len(site.shards) >= 4
    job = submit(site, model_home, "--array=0-1", "--output=logs/%x-%A_%a.out",
                 node_args="--threads 1 --batch-size 4")
    wait_until(lambda: finished(job, 2), 120, f"array job {job}")
    assert sorted(sacct_states(job)) == [(f"{job}_0", "COMPLETED"), (f"{job}_1", "COMPLETED")]
    check_exactly_once(site)
    t0, t1 = log_of(site, job, 0), log_of(site, job, 1)
    # 3 spools (n0, n1, n2, and the TA's, which holds none) over 2 tasks: i, i+2, ...
    assert re.search(r"task 0\] start .*2 of 3 spool\(s\): \S+/n0 \S+/n2", t0), t0
    assert re.search(r"task 1\] start .*1 of 3 spool\(s\): \S+/n1$", t1, re.M), t1
    assert "all shares done" in t0 and "all shares done" in t1


def test_preempted_twice_every_request_exactly_once(slurm: str, tmp_path: Path,
                                                    engine: ReferenceEngine,
                                                    model_home: Path) -> None:
    site = make_site(tmp_path, engine, executors=("n0",), requests=32, max_tokens=24)
    (shard,) = site.shards
    spool = site.spool("n0")
    job = submit(site, model_home, "--array=0-0", node_args="--threads 1 --batch-size 2")
    task = f"{job}_0"

    def run_mid_shard(restarts: int) -> int:
        """Wait for run number `restarts` to finish a batch of its own; return progress then.
        (Only once the new run logged its start is the previous worker surely gone.)"""
        wait_until(lambda: f"restart count {restarts});" in log_of(site, job, 0), 120,
                   f"run {restarts} of {task} to start")
        base = spool.progress(shard.shard_id)
        return int(wait_until(lambda: base < spool.progress(shard.shard_id) < 32  # type: ignore
                              and spool.progress(shard.shard_id), 120,
                              f"run {restarts} mid-shard"))

    def requeued() -> None:
        wait_until(lambda: sh("squeue", "-h", "-j", task, "-o", "%T").strip() == "PENDING",
                   60, f"{task} requeued")
        # Skip BeginTime's ~2 min wait, but not into the second of the kill: slurmd revoked
        # the old run's credential then, with 1 s resolution, and refuses a relaunch in the
        # same second ("Job credential revoked"), which fails the task.
        second = int(time.time())
        wait_until(lambda: int(time.time()) > second, 2, "the next second")
        sh("scontrol", "update", f"jobid={task}", "StartTime=now")

    first = run_mid_shard(0)
    sh("scontrol", "requeue", task)  # Slurm TERMs the job, as on preemption
    requeued()
    second = run_mid_shard(1)
    sh("scancel", "--signal=USR2", "--batch", task)  # as --signal=B:USR2@120 does
    requeued()
    wait_until(lambda: finished(job, 1), 120, f"{task} to complete")

    assert check_exactly_once(site) == {shard.shard_id: 32}
    states = [s for _, s in sacct_states(job)]
    assert states == ["REQUEUED", "REQUEUED", "COMPLETED"], states
    log = log_of(site, job, 0)
    assert "restart count 2" in log
    # both interruptions stopped the worker cleanly between batches, with a checkpoint
    by_term = re.search(r"stopped by SIGTERM after (\d+)/32 requests", log)
    by_usr2 = re.search(r"stopped by SIGUSR2 after (\d+)/32 requests", log)
    assert by_term and by_usr2, log
    assert "got SIGUSR2; forwarding to the worker" in log and f"requeueing {task}" in log
    assert first <= int(by_term[1]) < second <= int(by_usr2[1]) < 32
    # the last run generated only what no checkpoint held
    assert "32 requests" in log and f"({by_usr2[1]} from checkpoint)" in log, log
