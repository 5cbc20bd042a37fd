"""The ML node is preemption-safe: checkpoint per engine batch, resume, stop on a signal.

In process: a stop requested after the first batch leaves exactly that batch checkpointed and
no output; the resumed run generates only the rest, and its output and signed artifact equal
an uninterrupted run's (same Merkle root), each request once. A checkpoint of another shard is
refused loudly. Out of process: a real `gonka-hpc node` is sent a real SIGUSR2 or SIGTERM
mid-shard, exits with code 75 leaving a checkpoint, and a second run completes the shard.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from spoolkit import check_exactly_once, make_site

from gonka_hpc.artifacts import read_batch
from gonka_hpc.engines.reference import ReferenceEngine
from gonka_hpc.errors import GonkaError
from gonka_hpc.node import EXIT_PREEMPTED, Preempted, StopSignal, run_node, run_shard

SCALE = float(os.environ.get("GONKA_TIMEOUT_SCALE", "1"))


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout * SCALE
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout * SCALE:.0f}s waiting for {what}")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def engine(tiny_model) -> ReferenceEngine:  # type: ignore[no-untyped-def]
    return ReferenceEngine(tiny_model.path, k=5, model_hash=tiny_model.content_hash)


class RecordingEngine:
    """The real engine, recording which request ids it was asked to generate."""

    def __init__(self, inner: ReferenceEngine, after_batch: Callable[[], None] = lambda: None):
        self.inner, self.asked, self.after_batch = inner, [], after_batch

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self.inner, name)

    def generate(self, requests, progress=None):  # type: ignore[no-untyped-def]
        self.asked.extend(r.request_id for r in requests)
        out = self.inner.generate(requests, progress)
        self.after_batch()
        return out


def test_stop_checkpoints_and_resume_answers_each_request_once(tmp_path: Path,
                                                               engine: ReferenceEngine) -> None:
    site = make_site(tmp_path / "a", engine, executors=("n0",), requests=10, max_tokens=8)
    ref = make_site(tmp_path / "b", engine, executors=("n0",), requests=10, max_tokens=8)
    (shard,), (ref_shard,) = site.shards, ref.shards
    spool, me = site.spool("n0"), site.ids["n0"]

    stop = StopSignal()
    first = RecordingEngine(engine, after_batch=lambda: setattr(stop, "signum", signal.SIGUSR2))
    with pytest.raises(Preempted, match=r"SIGUSR2 after 4/10 requests") as exc:
        run_shard(spool, shard, me, first, lambda r: r.record_id,  # type: ignore[arg-type]
                  batch_size=4, stop=stop)
    assert exc.value.exit_code == EXIT_PREEMPTED == 75
    assert len(first.asked) == 4  # the batch in flight finished, no other started
    assert [p.name for p in spool.partial_dir(shard.shard_id).iterdir()] == ["batch-000000.json"]
    assert spool.progress(shard.shard_id) == 4
    assert not spool.output_path(shard.shard_id).exists()
    assert not spool.artifact_path(shard.shard_id).exists()

    second = RecordingEngine(engine)
    posted: list = []
    res = run_shard(spool, shard, me, second, posted.append, batch_size=4)  # type: ignore[arg-type]
    assert res.restored == 4 and not res.resumed
    assert sorted(second.asked) == sorted(r.request_id for r in shard.requests[4:])
    (site.inbox / f"{posted[0].record_id}.json").write_bytes(posted[0].encode())
    assert set(check_exactly_once(site).values()) == {10}

    # determinism: the interrupted shard's artifact equals an uninterrupted run's
    run_shard(ref.spool("n0"), ref_shard, ref.ids["n0"], engine, lambda r: r.record_id,
              batch_size=4)
    got = read_batch(spool.artifact_path(shard.shard_id)).header.merkle_root
    want = read_batch(ref.spool("n0").artifact_path(ref_shard.shard_id)).header.merkle_root
    assert got == want
    assert _lines(spool.output_path(shard.shard_id)) == _lines(
        ref.spool("n0").output_path(ref_shard.shard_id))


def _lines(path: Path) -> list[dict]:
    """Output lines without their wall-clock `created` stamp."""
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    for x in lines:
        x["response"]["body"].pop("created")
    return lines


def test_checkpoint_of_another_shard_is_refused(tmp_path: Path,
                                                engine: ReferenceEngine) -> None:
    site = make_site(tmp_path, engine, executors=("n0",), requests=3, max_tokens=4)
    (shard,) = site.shards
    spool = site.spool("n0")
    stop = StopSignal()
    stop.signum = signal.SIGTERM
    rec = RecordingEngine(engine, after_batch=lambda: None)
    with pytest.raises(Preempted):  # stop already requested: nothing is generated
        run_node(spool, site.ids["n0"], rec, lambda r: r.record_id,  # type: ignore[arg-type]
                 batch_size=2, stop=stop, log=lambda s: None)
    assert rec.asked == []
    run_shard(spool, shard, site.ids["n0"], engine, lambda r: r.record_id, batch_size=2,
              stop=StopSignal())  # completes; now forge a stale checkpoint for a rerun
    spool.done_path(shard.shard_id).unlink()
    spool.artifact_path(shard.shard_id).unlink()
    part = spool.partial_dir(shard.shard_id)
    part.mkdir()
    (part / "batch-000000.json").write_text(json.dumps(
        {"v": 1, "shard_sha256": "00" * 32, "executor": "n0", "model_hash": shard.model_hash,
         "generations": []}))
    with pytest.raises(GonkaError, match="checkpoint of another shard"):
        run_shard(spool, shard, site.ids["n0"], engine, lambda r: r.record_id)
    (part / "batch-000000.json").write_text("{not json")
    with pytest.raises(GonkaError, match="unreadable checkpoint"):
        run_shard(spool, shard, site.ids["n0"], engine, lambda r: r.record_id)


@pytest.mark.parametrize("signum", [signal.SIGUSR2, signal.SIGTERM], ids=["USR2", "TERM"])
def test_real_signal_to_a_real_node(tmp_path: Path, engine: ReferenceEngine, model_home: Path,
                                    signum: int) -> None:
    site = make_site(tmp_path, engine, executors=("n0",), requests=16, max_tokens=24)
    (shard,) = site.shards
    spool = site.spool("n0")
    cmd = [sys.executable, "-m", "gonka_hpc.cli.main", "node", "--spool", str(spool.root),
           "--key", str(site.key("n0")), "--inbox", str(site.inbox), "--batch-size", "2",
           "--threads", "1"]
    env = {**os.environ, "GONKA_HOME": str(model_home)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: spool.progress(shard.shard_id) >= 2 or proc.poll() is not None,
                   120, "the node's first batch")
        proc.send_signal(signum)
        out, _ = proc.communicate(timeout=60 * SCALE)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = out.decode(errors="replace")
    assert proc.returncode == EXIT_PREEMPTED, text
    assert f"preempted: shard {shard.shard_id}: stopped by {signal.Signals(signum).name}" in text
    n_done = spool.progress(shard.shard_id)
    assert 2 <= n_done < 16
    assert len(list(spool.partial_dir(shard.shard_id).glob("batch-*.json"))) == n_done // 2
    assert not spool.is_done(shard.shard_id)

    again = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False,
                           timeout=120 * SCALE)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"({n_done} from checkpoint)" in again.stderr
    assert check_exactly_once(site) == {shard.shard_id: 16}
