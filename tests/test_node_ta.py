"""Transfer agent and ML-node worker on the real local model, without validators.

Records the TA and the node would post are collected in a list, so each can be checked:
signed by the right key, bound to the shard written to the spool. The node must be
resumable: done shards are skipped, a whole artifact is committed again rather than
regenerated, and the same record comes out.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from gonka_hpc.engines.reference import ReferenceEngine
from gonka_hpc.errors import GonkaError
from gonka_hpc.identity import Identity
from gonka_hpc.jobfile import read_job_file
from gonka_hpc.node import run_node
from gonka_hpc.records import SignedRecord
from gonka_hpc.sampling import derive_seed
from gonka_hpc.spool import Spool
from gonka_hpc.transfer_agent import TransferAgent, authorize_escrow

WEIGHTS = {"uni-a": 10, "uni-b": 20, "dc-c": 30}
IDS = {n: Identity.from_seed(n, bytes([i + 1]) * 32) for i, n in enumerate(
    [*WEIGHTS, "alice"])}
BLOCK = "ab" * 32


def _job(tmp: Path, n: int = 6, extra: list[str] | None = None) -> Path:
    lines = [json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
                         "body": {"model": "gonka-tiny", "prompt": "the small cat",
                                  "max_tokens": 12, "temperature": 0.8, "seed": i}})
             for i in range(n)]
    path = tmp / "job.jsonl"
    path.write_text("\n".join(lines + (extra or [])) + "\n")
    return path


@pytest.fixture(scope="module")
def engine(tiny_model) -> ReferenceEngine:  # type: ignore[no-untyped-def]
    return ReferenceEngine(tiny_model.path, k=5, model_hash=tiny_model.content_hash)


def _ta(tmp: Path, engine: ReferenceEngine, posted: list[SignedRecord]) -> TransferAgent:
    spools = {n: Spool(tmp / "spool" / n) for n in WEIGHTS}
    return TransferAgent(IDS["uni-a"], epoch=1, model="gonka-tiny",
                         model_hash=engine.model_hash, k=5, price_per_token=10,
                         tokenizer=engine.tokenizer, max_model_len=engine.max_model_len,
                         spools=spools, post=lambda r: posted.append(r) or r.record_id)


def _accept(tmp: Path, engine: ReferenceEngine, posted: list[SignedRecord],
            job_path: Path, block: str = BLOCK):  # type: ignore[no-untyped-def]
    ta = _ta(tmp, engine, posted)
    job = ta.admit(read_job_file(job_path, model="gonka-tiny", max_tokens_limit=256))
    job_id, escrow, sig = authorize_escrow(IDS["alice"], job, ta="uni-a", epoch=1,
                                           price_per_token=10)
    return ta, ta.accept(job, client="alice", job_id=job_id, escrow=escrow,
                         client_signature=sig, block_hash=block, weights=WEIGHTS)


def test_ta_assigns_signs_and_spools(tmp_path: Path, engine: ReferenceEngine) -> None:
    posted: list[SignedRecord] = []
    _, plan = _accept(tmp_path, engine, posted, _job(tmp_path))
    assert "uni-a" not in plan.shards  # never the TA's own participant
    assert plan.escrow == 6 * 12 * 10
    kinds = [r.kind for r in posted]
    assert kinds[0] == "job_accepted" and set(kinds[1:]) == {"inference_assigned"}
    for rec in posted:
        rec.verify(IDS["uni-a"].public_hex)
    for rec in posted[1:]:
        body = rec.typed_body()
        spool = Spool(tmp_path / "spool" / body.executor)
        shard = spool.load(spool.inbox / f"{body.shard_id}.json")
        assert shard.sha256 == body.shard_hash
        assert [r.request_id for r in shard.requests] == list(body.request_ids)
        for r in shard.requests:
            assert int(r.seed) == derive_seed(BLOCK, r.request_id, int(r.custom_id[1:]))


def test_executor_choice_is_weighted_and_replayable(tmp_path: Path,
                                                    engine: ReferenceEngine) -> None:
    ta = _ta(tmp_path, engine, [])
    picks = Counter(ta.choose_executor(BLOCK, f"job:{i}", WEIGHTS) for i in range(1000))
    assert set(picks) == {"uni-b", "dc-c"}
    assert 0.53 < picks["dc-c"] / 1000 < 0.67  # 30 / (20 + 30) = 0.6
    again = [ta.choose_executor(BLOCK, f"job:{i}", WEIGHTS) for i in range(50)]
    other = [ta.choose_executor("cd" * 32, f"job:{i}", WEIGHTS) for i in range(50)]
    assert again == [ta.choose_executor(BLOCK, f"job:{i}", WEIGHTS) for i in range(50)]
    assert again != other
    with pytest.raises(GonkaError, match="no executor"):
        ta.choose_executor(BLOCK, "x", {"uni-a": 10})


def test_request_too_long_for_the_model_is_an_error_line(tmp_path: Path,
                                                         engine: ReferenceEngine) -> None:
    long_prompt = json.dumps({"custom_id": "long", "method": "POST", "url": "/v1/completions",
                              "body": {"model": "gonka-tiny", "prompt": "one two " * 200,
                                       "max_tokens": 256}})
    _, plan = _accept(tmp_path, engine, [], _job(tmp_path, 2, [long_prompt]))
    assert [(e.line, e.field) for e in plan.job.errors] == [(3, "body.prompt")]
    assert "context of 512 tokens" in plan.job.errors[0].message


class CountingEngine:
    """Passes through to the real engine, counting generate() calls."""

    def __init__(self, inner: ReferenceEngine) -> None:
        self.inner, self.calls = inner, 0

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self.inner, name)

    def generate(self, requests, progress=None):  # type: ignore[no-untyped-def]
        self.calls += 1
        return self.inner.generate(requests, progress)


def test_node_runs_delivers_and_resumes(tmp_path: Path, engine: ReferenceEngine) -> None:
    posted: list[SignedRecord] = []
    ta, plan = _accept(tmp_path, engine, posted, _job(tmp_path, 6, ["{bad json"]))
    commits: dict[str, SignedRecord] = {}
    for executor in plan.shards:
        spool = Spool(tmp_path / "spool" / executor)
        counting = CountingEngine(engine)
        node_posted: list[SignedRecord] = []
        results = run_node(spool, IDS[executor], counting,  # type: ignore[arg-type]
                           lambda r, sink=node_posted: sink.append(r) or r.record_id,
                           log=lambda s: None)
        assert len(results) == 1 and not results[0].resumed and counting.calls >= 1
        commit = node_posted[0]
        commit.verify(IDS[executor].public_hex)
        commits[executor] = commit
        # restart: the done shard is skipped, nothing generated, nothing posted
        again: list[SignedRecord] = []
        assert run_node(spool, IDS[executor], counting, again.append, log=lambda s: None) == []
        assert again == []
        # crash after the artifact, before the marker: committed from the file, not re-run
        shard_id = results[0].shard_id
        spool.done_path(shard_id).unlink()
        calls = counting.calls
        res = run_node(spool, IDS[executor], counting, again.append, log=lambda s: None)
        assert res[0].resumed and counting.calls == calls
        assert again[0].record_id == commit.record_id
    out = tmp_path / "client.output.jsonl"
    delivered = ta.deliver(plan, out)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["custom_id"] for x in lines] == ["r0", "r1", "r2", "r3", "r4", "r5", None]
    assert lines[-1]["error"]["line"] == 7
    assert delivered.typed_body().n_errors == 1
    assert all(x["response"]["body"]["usage"]["completion_tokens"] <= 12 for x in lines[:-1])


def test_node_refuses_foreign_shards(tmp_path: Path, engine: ReferenceEngine) -> None:
    _, plan = _accept(tmp_path, engine, [], _job(tmp_path))
    executor = next(iter(plan.shards))
    spool = Spool(tmp_path / "spool" / executor)
    impostor = "dc-c" if executor == "uni-b" else "uni-b"
    with pytest.raises(GonkaError, match="assigned to"):
        run_node(spool, IDS[impostor], engine, lambda r: r.record_id, log=lambda s: None)


def test_delivery_refuses_lines_the_artifact_does_not_back(tmp_path: Path,
                                                           engine: ReferenceEngine) -> None:
    ta, plan = _accept(tmp_path, engine, [], _job(tmp_path, 4))
    for executor in plan.shards:
        run_node(Spool(tmp_path / "spool" / executor), IDS[executor], engine,
                 lambda r: r.record_id, log=lambda s: None)
    executor, shard = next(iter(plan.shards.items()))
    out_file = Spool(tmp_path / "spool" / executor).output_path(shard.shard_id)
    lines = [json.loads(x) for x in out_file.read_text().splitlines()]
    lines[0]["response"]["body"]["choices"][0]["text"] = "something the model never said"
    out_file.write_text("".join(json.dumps(x) + "\n" for x in lines[:-1] if x) +
                        ("{broken json\n" if len(lines) > 1 else ""))
    delivered = ta.deliver(plan, tmp_path / "client.jsonl")
    got = {x["custom_id"]: x for x in map(json.loads,
                                          (tmp_path / "client.jsonl").read_text().splitlines())}
    bad = got[shard.requests[0].custom_id]["response"]
    assert bad["status_code"] == 500
    assert "not the decoding of the committed tokens" in bad["body"]["error"]["message"]
    if len(lines) > 1:
        missing = got[shard.requests[-1].custom_id]["response"]
        assert missing["status_code"] == 500
    assert delivered.typed_body().n_errors == (2 if len(lines) > 1 else 1)
    assert len(got) == 4
