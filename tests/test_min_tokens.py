"""`min_tokens` (vLLM's semantics), end to end: job file, engines, artifact, shard, verification.

No EOS is selected at an output position below min_tokens (EOS at -inf in the selection
logprobs, before top-k / top-p / Gumbel; reported logprobs stay raw), and a stop string counts
only once completed by a token at a position >= min_tokens. An honest executor that honours it
passes verification; one that ignores it fails with a reason naming min_tokens.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from gonka_hpc.artifacts import Inference, file_sha256, read_batch, write_batch
from gonka_hpc.config import REPO_ROOT
from gonka_hpc.engines.base import (
    GenerationRequest,
    decode,
    output_text,
    stop_reached,
    stop_start,
)
from gonka_hpc.engines.reference import ReferenceEngine
from gonka_hpc.identity import Identity
from gonka_hpc.jobfile import LineError, Request, read_job_file
from gonka_hpc.merkle import merkle_root
from gonka_hpc.sampling import SamplingParams, ban_eos, derive_seed
from gonka_hpc.spool import Shard, ShardRequest
from verify.attacks import inference_of, prefix
from verify.scoring import Rules, check_ending, check_inference, measure
from verify.thresholds import load_thresholds
from verify.verifier import verify_batch

TH = load_thresholds(REPO_ROOT / "configs" / "verification.yaml")
MODEL = "gonka-tiny"
PROMPTS = ["the small cat", "a quick fox", "tell me about the owl", "the dog is happy and it",
           "list the settings : name=alice ;", "a gentle horse jumps"]
EXEC = Identity.from_seed("uni-b", bytes([3]) * 32)
VERIFIER = Identity.from_seed("dc-c", bytes([4]) * 32)


# --- job file -------------------------------------------------------------------------------


def _line(url: str = "/v1/completions", **body: object) -> str:
    b: dict[str, object] = {"model": MODEL, "max_tokens": 8, **body}
    if url == "/v1/completions":
        b.setdefault("prompt", "one two")
    else:
        b.setdefault("messages", [{"role": "user", "content": "hi"}])
    return json.dumps({"custom_id": "x", "method": "POST", "url": url, "body": b})


def _parse(tmp_path: Path, line: str) -> Request | LineError:
    path = tmp_path / "job.jsonl"
    path.write_text(_line(max_tokens=4).replace('"x"', '"ok"') + "\n" + line + "\n")
    job = read_job_file(path, model=MODEL, max_tokens_limit=64)
    assert isinstance(job.entries[0], Request)
    return job.entries[1]


@pytest.mark.parametrize("url", ["/v1/completions", "/v1/chat/completions"])
def test_job_file_carries_min_tokens(tmp_path: Path, url: str) -> None:
    req = _parse(tmp_path, _line(url, min_tokens=8))
    assert isinstance(req, Request) and req.min_tokens == 8
    req = _parse(tmp_path, _line(url))
    assert isinstance(req, Request) and req.min_tokens == 0


@pytest.mark.parametrize("body, message", [
    ({"min_tokens": 9}, "9 is over max_tokens 8"),
    ({"min_tokens": -1}, "greater than or equal to 0"),
    ({"min_tokens": "4"}, "valid integer"),
    ({"min_tokens": 2.5}, "valid integer"),
    ({"min_tokens": True}, "valid integer"),
])
def test_bad_min_tokens_names_line_and_field(tmp_path: Path, body: dict, message: str) -> None:
    err = _parse(tmp_path, _line(**body))
    assert isinstance(err, LineError)
    assert (err.line, err.field) == (2, "body.min_tokens")
    assert message in err.message
    assert err.describe("job.jsonl").startswith("job.jsonl:2: field 'body.min_tokens': ")


def test_chat_min_tokens_is_bounded_by_max_completion_tokens(tmp_path: Path) -> None:
    err = _parse(tmp_path, _line("/v1/chat/completions", max_completion_tokens=5,
                                 min_tokens=6))
    assert isinstance(err, LineError) and err.field == "body.min_tokens"
    assert "over max_completion_tokens 5" in err.message
    ok = _parse(tmp_path, _line("/v1/chat/completions", max_tokens=2, max_completion_tokens=6,
                                min_tokens=6))
    assert isinstance(ok, Request) and (ok.min_tokens, ok.max_tokens) == (6, 6)


# --- the rules ------------------------------------------------------------------------------


def test_ban_eos_bans_only_below_min_tokens() -> None:
    lp = torch.log_softmax(torch.randn(5, 11, dtype=torch.float64), dim=1)
    out = ban_eos(lp, [0, 1, 2, 3, 4], 3, eos_id=7)
    assert torch.isinf(out[:3, 7]).all() and (out[:3, 7] < 0).all()
    assert torch.equal(out[3:], lp[3:])
    keep = torch.ones(11, dtype=torch.bool)
    keep[7] = False
    assert torch.equal(out[:3][:, keep], lp[:3][:, keep])
    assert torch.isfinite(lp).all(), "the input is left as it was"
    per_row = ban_eos(lp[:3], [4, 4, 0], [5, 4, 1], eos_id=2)
    assert [math.isinf(float(v)) for v in per_row[:, 2]] == [True, False, True]
    with pytest.raises(ValueError, match="positions"):
        ban_eos(lp, [0, 1], 3, eos_id=7)


def test_stop_strings_count_only_after_the_min_tokens_text() -> None:
    assert stop_reached("a . b", ["."]) and not stop_reached("a . b", ["."], start=3)
    assert stop_reached("a . b .", ["."], start=3)
    # a stop string that straddles the boundary ends after it: it counts (as in vLLM)
    assert stop_reached("abcd", ["bc"], start=2)
    assert not stop_reached("abcd", ["bc"], start=3)


@pytest.fixture(scope="module")
def engine(tiny_model) -> ReferenceEngine:  # type: ignore[no-untyped-def]
    return ReferenceEngine(tiny_model.path, k=5, model_hash=tiny_model.content_hash)


def _requests(engine: ReferenceEngine, min_tokens: int, max_tokens: int = 24,
              stop: tuple[str, ...] = (), temperature: float = 0.9,
              top_p: float = 1.0) -> list[GenerationRequest]:
    return [GenerationRequest(f"job-1:{i}", tuple(engine.tokenizer.encode(p)), max_tokens,
                              SamplingParams(temperature, top_p, 0),
                              derive_seed("ee" * 32, f"job-1:{i}", None), stop, min_tokens)
            for i, p in enumerate(PROMPTS)]


def test_output_text_keeps_stop_strings_inside_the_min_tokens_text(
        engine: ReferenceEngine) -> None:
    ids = list(engine.tokenizer.encode(" the cat . the dog . the owl"))
    text = decode(engine.tokenizer, ids)
    first = text.index(".")
    assert output_text(engine.tokenizer, ids, ["."]) == text[:first]
    m = next(t for t in range(len(ids)) if "." in decode(engine.tokenizer, ids[:t]))
    start = stop_start(engine.tokenizer, ids, m)
    assert start > first
    assert output_text(engine.tokenizer, ids, ["."], m) == text[:text.index(".", start)]
    assert output_text(engine.tokenizer, ids, ["."], len(ids)) == text


# --- the reference engine -------------------------------------------------------------------


@pytest.mark.parametrize("stop", [(), (".",), (" the",)])
def test_min_equals_max_gives_max_tokens(engine: ReferenceEngine, stop: tuple[str, ...]) -> None:
    free = engine.generate(_requests(engine, 0, stop=stop))
    early = [g for g in free if len(g.output_ids) < 24]
    assert len(early) >= 3, "without min_tokens, some outputs must end early"
    held = engine.generate(_requests(engine, 24, stop=stop))
    assert [len(g.output_ids) for g in held] == [24] * len(held)
    assert {g.finish_reason for g in held} == {"length"}
    assert all(engine.eos_id not in g.output_ids for g in held)
    for g in held:  # every sampled token kept, the text not cut inside the min_tokens text
        assert g.text == decode(engine.tokenizer, g.output_ids)


def test_reported_logprobs_stay_raw(engine: ReferenceEngine) -> None:
    """Greedy: where the free run chose EOS, the held run reports EOS as the top raw token
    (the ban is in the selection only), and prefill reproduces every reported logprob."""
    free = engine.generate(_requests(engine, 0, temperature=0.0))
    held = engine.generate(_requests(engine, 24, temperature=0.0))
    eos_ends = [(f, h) for f, h in zip(free, held, strict=True)
                if f.output_ids[-1] == engine.eos_id]
    assert eos_ends, "need a greedy output that ends on EOS"
    for f, h in eos_ends:
        p = len(f.output_ids) - 1
        assert h.output_ids[:p] == f.output_ids[:p]
        assert int(h.topk_ids[p][0]) == engine.eos_id and h.output_ids[p] != engine.eos_id
    reqs = _requests(engine, 24, temperature=0.0)
    scores = engine.score([(r.prompt_ids, h.output_ids) for r, h in zip(reqs, held)])
    for h, s in zip(held, scores, strict=True):
        np.testing.assert_allclose(h.token_logprobs, s.token_logprobs, atol=1e-4)
        np.testing.assert_array_equal(h.topk_ids, s.topk_ids)


def test_stop_ends_only_after_min_tokens(engine: ReferenceEngine) -> None:
    m = 8
    gens = engine.generate(_requests(engine, m, max_tokens=40, stop=(".",)))
    stopped = [g for g in gens if g.finish_reason == "stop"]
    assert stopped, "need an output that ends on its stop string after min_tokens"
    for g in gens:
        assert len(g.output_ids) > m or g.finish_reason == "length"
        ids = list(g.output_ids)
        start = stop_start(engine.tokenizer, ids, m)
        if g.finish_reason == "stop" and ids[-1] != engine.eos_id:
            assert stop_reached(decode(engine.tokenizer, ids), ["."], start)
            assert not stop_reached(decode(engine.tokenizer, ids[:-1]), ["."], start)
            assert "." not in g.text[start:]


# --- verification ---------------------------------------------------------------------------


def _rules(engine: ReferenceEngine, stop: tuple[str, ...] = ()) -> Rules:
    return Rules(engine.eos_id, engine.vocab_size, 5, stop,
                 lambda ids: decode(engine.tokenizer, ids))


def _check(engine: ReferenceEngine, infs: list[Inference], stop: tuple[str, ...] = ()) -> list:  # type: ignore[type-arg]
    scores = engine.score([(i.prompt_ids.tolist(), i.output_ids.tolist()) for i in infs])
    return [check_inference(i, s, TH, _rules(engine, stop)) for i, s in zip(infs, scores)]


@pytest.mark.parametrize("min_tokens, max_tokens, stop, top_p", [
    (24, 24, (), 1.0), (24, 24, (".",), 0.9), (8, 32, (".",), 1.0), (12, 32, (), 0.8)])
def test_honest_min_tokens_passes(engine: ReferenceEngine, min_tokens: int, max_tokens: int,
                                  stop: tuple[str, ...], top_p: float) -> None:
    reqs = _requests(engine, min_tokens, max_tokens, stop, top_p=top_p)
    infs = [inference_of(r, g) for r, g in zip(reqs, engine.generate(reqs), strict=True)]
    assert all(i.min_tokens == min_tokens for i in infs)
    evidence = _check(engine, infs, stop)
    assert [e.passed for e in evidence] == [True] * len(infs), [e.reasons for e in evidence]
    assert max(e.max_margin for e in evidence) <= 1e-4
    # prefixes (the calibration's shorter lengths) stay honest artifacts
    short = [prefix(i, 6) for i in infs]
    assert all(s.min_tokens == min(min_tokens, 6) for s in short)
    assert all(e.passed for e in _check(engine, short, stop))


def test_executor_ignoring_min_tokens_fails(engine: ReferenceEngine) -> None:
    """Generates with min_tokens 0 and claims the assigned 24: its early endings fail."""
    reqs = _requests(engine, 24)
    free = engine.generate([replace(r, min_tokens=0) for r in reqs])
    claimed = [inference_of(r, g) for r, g in zip(reqs, free, strict=True)]
    early = [i for i in claimed if i.output_ids.size < 24]
    assert len(early) >= 3
    evidence = _check(engine, early)
    assert not any(e.passed for e in evidence)
    for e in evidence:
        assert "min_tokens" in " ".join(e.reasons), e.reasons
    # the EOS position itself is impossible under the ban: an infinite margin, whatever the
    # ending check says
    for i, e in zip(early, evidence, strict=True):
        if int(i.output_ids[-1]) == engine.eos_id:
            assert math.isinf(e.max_margin)


def test_executor_ignoring_min_tokens_with_stop_strings_fails(engine: ReferenceEngine) -> None:
    reqs = _requests(engine, 16, max_tokens=32, stop=(".",))
    free = engine.generate([replace(r, min_tokens=0) for r in reqs])
    claimed = [inference_of(r, g) for r, g in zip(reqs, free, strict=True)]
    early = [i for i in claimed if i.output_ids.size <= 16]
    assert early
    for e in _check(engine, early, (".",)):
        assert not e.passed and "min_tokens" in " ".join(e.reasons)


def test_margins_use_the_banned_selection_logprobs(engine: ReferenceEngine) -> None:
    """Greedy honest outputs with min_tokens: margins 0 with the ban; measured as if
    min_tokens were 0, the position where EOS was the argmax shows a positive margin."""
    reqs = _requests(engine, 24, temperature=0.0)
    infs = [inference_of(r, g) for r, g in zip(reqs, engine.generate(reqs), strict=True)]
    scores = engine.score([(i.prompt_ids.tolist(), i.output_ids.tolist()) for i in infs])
    with_ban = [measure(i, s, TH.lp_slack, TH.mass_slack, engine.eos_id)
                for i, s in zip(infs, scores, strict=True)]
    assert max(float(m.margins.max()) for m in with_ban) == 0.0
    without = [measure(replace(i, min_tokens=0), s, TH.lp_slack, TH.mass_slack)
               for i, s in zip(infs, scores, strict=True)]
    assert max(float(m.margins.max()) for m in without) > TH.sampling_margin
    # topk / sampled-token distances are measured on the raw logprobs either way
    for a, b in zip(with_ban, without, strict=True):
        np.testing.assert_array_equal(a.topk_errors, b.topk_errors)
        np.testing.assert_array_equal(a.sampled_errors, b.sampled_errors)
    with pytest.raises(ValueError, match="EOS id"):
        measure(infs[0], scores[0], TH.lp_slack, TH.mass_slack)


def test_check_ending_applies_the_min_tokens_stop_rule(engine: ReferenceEngine) -> None:
    """A stop string inside the first min_tokens tokens' text neither ends the output nor
    excuses a "stop"; one completed at position >= min_tokens does."""
    ids = list(engine.tokenizer.encode(" the cat sat . the dog ran far . the owl"))
    text = decode(engine.tokenizer, ids)
    first = next(t for t in range(1, len(ids)) if "." in decode(engine.tokenizer, ids[:t]))
    second = next(t for t in range(first + 1, len(ids))
                  if decode(engine.tokenizer, ids[:t]).count(".") == 2)
    assert text.count(".") == 2 and first < second

    def inf(n: int, m: int, finish: str) -> Inference:
        return Inference("r", np.arange(3, dtype=np.int32), np.asarray(ids[:n], np.int32),
                         np.zeros(n, np.float32), np.zeros((n, 5), np.int32),
                         np.zeros((n, 5), np.float32), 1, 1.0, 1.0, 0, 40, finish, m)

    rules = _rules(engine, (".",))
    assert check_ending(inf(first, 0, "stop"), rules) == []  # no min_tokens: the first "."
    m = first + 1  # the first "." lies inside the min_tokens text
    assert check_ending(inf(second, m, "stop"), rules) == []  # ends on the second "."
    bad = check_ending(inf(m + 1, m, "stop"), rules)  # claims a stop on the first "." only
    assert bad and "neither EOS nor a stop string" in " ".join(bad)
    bad = check_ending(inf(first, m, "stop"), rules)  # stops before min_tokens
    assert "min_tokens" in " ".join(bad)
    bad = check_ending(inf(second + 2, m, "stop"), rules)  # ran past the second "."
    assert "went on past a stop string" in " ".join(bad)


def _shard(reqs: list[GenerationRequest], model_hash: str) -> Shard:
    return Shard("job-1", "job-1-uni-b", 1, "uni-b", "uni-a", "ee" * 32, MODEL, model_hash, 5,
                 [ShardRequest(r.request_id, i, r.request_id, "/v1/completions",
                               list(r.prompt_ids), r.max_tokens, r.params.temperature,
                               r.params.top_p, r.params.top_k, str(r.seed), list(r.stop), None,
                               r.min_tokens) for i, r in enumerate(reqs)])


def test_batch_verifies_and_binding_catches_a_changed_min_tokens(
        tmp_path: Path, engine: ReferenceEngine) -> None:
    reqs = _requests(engine, 20, max_tokens=24)
    infs = [inference_of(r, g) for r, g in zip(reqs, engine.generate(reqs), strict=True)]
    shard = _shard(reqs, engine.model_hash)

    def run(claims: list[Inference], name: str):  # type: ignore[no-untyped-def]
        art = tmp_path / f"{name}.h5"
        batch = write_batch(art, EXEC, epoch=1, job_id="job-1", shard_id="job-1-uni-b",
                            model_hash=engine.model_hash, engine="reference",
                            engine_version="t", dtype="float32", k=5, inferences=claims)
        assigned = {"job_id": "job-1", "shard_id": "job-1-uni-b", "executor": "uni-b",
                    "request_ids": [r.request_id for r in reqs], "shard_hash": shard.sha256}
        committed = {"merkle_root": batch.header.merkle_root, "n_requests": len(reqs),
                     "n_tokens": batch.header.n_tokens, "model_hash": engine.model_hash,
                     "file_sha256": file_sha256(art)}
        return verify_batch(VERIFIER, engine, TH, artifact=art, shard=shard, assigned=assigned,
                            committed=committed, executor_pubkey=EXEC.public_hex, reputation=0,
                            block_hash="ff" * 32, epoch=1)

    ok = run(infs, "honest")
    body = ok.verdict.typed_body()
    assert (body.passed, body.checked, body.failed) == (True, len(reqs), 0)
    assert [int(i.min_tokens) for i in read_batch(tmp_path / "honest.h5").inferences] == \
        [20] * len(reqs)
    # the executor claims min_tokens 0 for its (early-ending) free run: binding says so
    free = engine.generate([replace(r, min_tokens=0) for r in reqs])
    lied = [replace(inference_of(r, g), min_tokens=0) for r, g in zip(reqs, free, strict=True)]
    bad = run(lied, "lied")
    assert not bad.verdict.typed_body().passed
    assert any("min_tokens (0, assigned 20)" in p for p in bad.binding_problems)


# --- formats --------------------------------------------------------------------------------


def test_artifact_v1_files_still_read_and_verify(tmp_path: Path) -> None:
    """A version-1 batch (no min_tokens) reads as min_tokens 0 and verifies as written."""
    rng = np.random.default_rng(0)
    infs = [Inference(f"job-1:{i}", rng.integers(0, 99, 5).astype(np.int32),
                      rng.integers(0, 99, 4).astype(np.int32), -rng.random(4).astype(np.float32),
                      rng.integers(0, 99, (4, 5)).astype(np.int32),
                      -rng.random((4, 5)).astype(np.float32), 7 + i, 0.7, 1.0, 0, 4, "length")
            for i in range(3)]
    path = tmp_path / "v1.h5"
    batch = write_batch(path, EXEC, epoch=1, job_id="job-1", shard_id="s", model_hash="m" * 64,
                        engine="reference", engine_version="t", dtype="float32", k=5,
                        inferences=infs)
    root = merkle_root([i.leaf(1) for i in infs])
    header = replace(batch.header, merkle_root=root)
    with h5py.File(path, "r+") as f:  # what gonka-hpc 0.1 wrote
        f.attrs["format_version"] = 1
        f.attrs["merkle_root"] = root
        f.attrs["signature"] = EXEC.sign(header.signing_bytes(1))
        del f["min_tokens"]
    back = read_batch(path)
    assert back.format_version == 1 and [i.min_tokens for i in back.inferences] == [0, 0, 0]
    back.verify(EXEC.public_hex)
    assert root != batch.header.merkle_root, "min_tokens is part of a version-2 leaf"
    # a version-2 batch whose min_tokens is edited no longer matches its root
    v2 = tmp_path / "v2.h5"
    write_batch(v2, EXEC, epoch=1, job_id="job-1", shard_id="s", model_hash="m" * 64,
                engine="reference", engine_version="t", dtype="float32", k=5,
                inferences=[replace(i, min_tokens=2) for i in infs])
    with h5py.File(v2, "r+") as f:
        f["min_tokens"][0] = 0
    with pytest.raises(Exception, match="Merkle root"):
        read_batch(v2).verify(EXEC.public_hex)


def test_leaf_and_shard_golden_bytes() -> None:
    """The version-2 encodings, pinned (docs/formats.md)."""
    inf = Inference("job-1:0", np.arange(5, dtype=np.int32), np.arange(4, dtype=np.int32),
                    np.zeros(4, np.float32), np.zeros((4, 5), np.int32),
                    np.zeros((4, 5), np.float32), 7, 0.7, 1.0, 0, 4, "length", 2)
    head = (b'{"finish_reason":"length","k":5,"max_tokens":4,"min_tokens":2,"n_output":4,'
            b'"n_prompt":5,"request_id":"job-1:0","seed":"7","temperature":0.7,"top_k":0,'
            b'"top_p":1.0,"v":2}')
    assert inf.leaf_bytes().startswith(head + bytes(4))
    with pytest.raises(ValueError, match="version-1"):
        inf.leaf_bytes(1)
    v1_head = head.replace(b'"min_tokens":2,', b"").replace(b'"v":2', b'"v":1')
    assert replace(inf, min_tokens=0).leaf_bytes(1).startswith(v1_head + bytes(4))
    req = ShardRequest("j:1", 1, "a", "/v1/completions", [1], 8, 0.5, 1.0, 0, "5", [], None, 3)
    raw = Shard("j", "j-x", 1, "x", "ta", "ee", MODEL, "mm", 5, [req]).encode()
    assert raw == (b'{"block_hash":"ee","epoch":1,"executor":"x","job_id":"j","k":5,'
                   b'"model":"gonka-tiny","model_hash":"mm","requests":[{"custom_id":"a",'
                   b'"line":1,"max_tokens":8,"min_tokens":3,"prompt_ids":[1],"request_id":"j:1",'
                   b'"seed":"5","stop":[],"temperature":0.5,"top_k":0,"top_logprobs":null,'
                   b'"top_p":1.0,"url":"/v1/completions"}],"shard_id":"j-x","ta":"ta","v":2}')


def test_shard_v1_reads_as_min_tokens_0_and_keeps_its_hash() -> None:
    req = ShardRequest("j:1", 1, "a", "/v1/completions", [1, 2], 8, 0.7, 1.0, 0, "5", ["."],
                       None)
    v1 = Shard("j", "j-x", 1, "x", "ta", "ee" * 32, MODEL, "m" * 64, 5, [req], version=1)
    raw = v1.encode()
    assert b"min_tokens" not in raw and b'"v":1' in raw
    back = Shard.decode(raw)
    assert back.requests[0].min_tokens == 0 and back.encode() == raw
    v2 = replace(v1, version=2, requests=[replace(req, min_tokens=3)])
    assert Shard.decode(v2.encode()).requests[0].min_tokens == 3
    assert b'"min_tokens":3' in v2.encode() and b'"v":2' in v2.encode()
    with pytest.raises(ValueError, match="version-1"):
        replace(v1, requests=[replace(req, min_tokens=3)]).encode()


# --- end to end -----------------------------------------------------------------------------


@pytest.mark.slow
def test_gonka_hpc_run_with_min_tokens(model_home: Path, tiny_model, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A whole epoch on a job file with min_tokens: outputs honour it and the epoch verifies."""
    lines = []
    for cid, prompt, t, top_p, stop in [("s1", "the small cat", 0.8, 0.95, None),
                                        ("s2", "a quick fox", 1.0, 1.0, "."),
                                        ("s3", "tell me about the owl", 0.0, 1.0, None),
                                        ("s4", "the dog is happy and it", 0.9, 0.9, " the")]:
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 32, "min_tokens": 20,
                "temperature": t, "top_p": top_p, "seed": 5, **({"stop": stop} if stop else {})}
        lines.append({"custom_id": cid, "method": "POST", "url": "/v1/completions",
                      "body": body})
    lines.append({"custom_id": "c1", "method": "POST", "url": "/v1/chat/completions",
                  "body": {"model": MODEL, "messages": [{"role": "user",
                                                         "content": "tell me a story"}],
                           "max_completion_tokens": 24, "min_tokens": 24, "temperature": 0.7}})
    lines.append({"custom_id": "bad", "method": "POST", "url": "/v1/completions",
                  "body": {"model": MODEL, "prompt": "x", "max_tokens": 8, "min_tokens": 9}})
    job = tmp_path / "mt.jsonl"
    job.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "GONKA_HOME": str(model_home)}
    proc = subprocess.run([sys.executable, "-m", "gonka_hpc.cli.main", "run", str(job),  # noqa: PLW1510
                           "--out", str(out), "--quiet"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    outputs = [json.loads(x) for x in
               (out / "outputs" / "mt.output.jsonl").read_text().splitlines()]
    assert [o["custom_id"] for o in outputs] == [x["custom_id"] for x in lines]
    want = {"s1": 20, "s2": 20, "s3": 20, "s4": 20, "c1": 24}
    kept = 0
    for o in outputs[:-1]:
        assert o["response"]["status_code"] == 200, o  # backed by the committed artifact
        body = o["response"]["body"]
        assert body["usage"]["completion_tokens"] >= want[o["custom_id"]], o
        if o["custom_id"] in ("s2", "s4"):
            choice = body["choices"][0]
            if choice["finish_reason"] == "stop":
                assert body["usage"]["completion_tokens"] > 20, o
            kept += ("." if o["custom_id"] == "s2" else " the") in choice["text"]
    assert kept, "a stop string inside the min_tokens text stays in the text"
    assert outputs[-1]["error"]["field"] == "body.min_tokens"
    arts = sorted((out / "spool").glob("*/out/*.h5"))
    mins = sorted(i.min_tokens for a in arts for i in read_batch(a).inferences)
    assert mins == [20, 20, 20, 20, 24]
    s = json.loads((out / "summary.json").read_text())
    assert s["inferences_verified"] == s["answered"] == 5  # reputation 0: everything checked
    assert s["verdicts"] and all(v["passed"] and v["failed"] == 0 for v in s["verdicts"])
    assert s["forfeited"] == [] and s["disputes"] == []
    audit = subprocess.run([sys.executable, "-m", "gonka_hpc.cli.main", "audit", str(out),  # noqa: PLW1510
                            "--rescore"], capture_output=True, text=True, env=env, timeout=300)
    assert audit.returncode == 0, audit.stdout + audit.stderr
    assert "re-scored identically" in audit.stdout
    assert audit.stdout.count("OK batch") == len(arts) >= 1
