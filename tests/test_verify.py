"""The verifier: honest work passes; each cheat the spine must catch is caught.

Artifacts come from the real reference engine on the local model. Cheats are made with the
project's own tools: the pre-fill attack (the smaller model generates, the real model's
logprobs are reported), another seed, another temperature, one edited token, a truncated
output, and an artifact replayed under another shard. Binding problems and sampling margins
are asserted separately, so each check is shown to do its own work.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from gonka_hpc.artifacts import Inference, file_sha256, write_batch
from gonka_hpc.config import REPO_ROOT
from gonka_hpc.engines.base import GenerationRequest, decode
from gonka_hpc.engines.prefill_attack import PrefillAttackEngine
from gonka_hpc.engines.reference import ReferenceEngine
from gonka_hpc.identity import Identity
from gonka_hpc.model import ensure_model
from gonka_hpc.sampling import SamplingParams, derive_seed
from gonka_hpc.spool import Shard, ShardRequest
from verify.policy import assign_verifier, sample_rate, sample_requests
from verify.scoring import Rules, check_inference
from verify.thresholds import load_thresholds
from verify.verifier import verify_batch

TH = load_thresholds(REPO_ROOT / "configs" / "verification.yaml")
PROMPTS = ["the small cat", "a quick fox", "tell me about the owl", "the dog is happy and it",
           "list the settings : name=alice ;", "a gentle horse jumps"]
EXEC = Identity.from_seed("uni-b", bytes([3]) * 32)
VERIFIER = Identity.from_seed("dc-c", bytes([4]) * 32)


@pytest.fixture(scope="module")
def engine(tiny_model) -> ReferenceEngine:  # type: ignore[no-untyped-def]
    return ReferenceEngine(tiny_model.path, k=5, model_hash=tiny_model.content_hash)


def _requests(engine: ReferenceEngine, temperature: float = 0.9, top_p: float = 1.0,
              max_tokens: int = 32) -> list[GenerationRequest]:
    return [GenerationRequest(f"job-1:{i}", tuple(engine.tokenizer.encode(p)), max_tokens,
                              SamplingParams(temperature, top_p, 0),
                              derive_seed("ee" * 32, f"job-1:{i}", None))
            for i, p in enumerate(PROMPTS)]


def _inferences(reqs: list[GenerationRequest], gens) -> list[Inference]:  # type: ignore[no-untyped-def]
    return [Inference(r.request_id, np.asarray(r.prompt_ids, np.int32),
                      np.asarray(g.output_ids, np.int32), g.token_logprobs, g.topk_ids,
                      g.topk_logprobs, r.seed, r.params.temperature, r.params.top_p,
                      r.params.top_k, r.max_tokens, g.finish_reason)
            for r, g in zip(reqs, gens)]


def _rules(engine: ReferenceEngine, stop: tuple[str, ...] = ()) -> Rules:
    return Rules(engine.eos_id, engine.vocab_size, 5, stop,
                 lambda ids: decode(engine.tokenizer, ids))


def _check(engine: ReferenceEngine, infs: list[Inference],
           stop: tuple[str, ...] = ()) -> list:  # type: ignore[type-arg]
    scores = engine.score([(i.prompt_ids.tolist(), i.output_ids.tolist()) for i in infs])
    return [check_inference(i, s, TH, _rules(engine, stop)) for i, s in zip(infs, scores)]


@pytest.mark.parametrize("temperature, top_p", [(0.0, 1.0), (0.7, 0.9), (1.0, 1.0)])
def test_honest_work_passes_with_zero_margin(engine: ReferenceEngine, temperature: float,
                                             top_p: float) -> None:
    reqs = _requests(engine, temperature, top_p)
    evidence = _check(engine, _inferences(reqs, engine.generate(reqs)))
    assert all(e.passed for e in evidence), [e.reasons for e in evidence]
    assert max(e.max_margin for e in evidence) <= 1e-4
    assert max(e.topk_distance for e in evidence) <= 1e-3


def test_honest_batch_composition_noise_passes(engine: ReferenceEngine) -> None:
    reqs = _requests(engine)
    alone = [engine.generate([r])[0] for r in reqs[:2]]
    evidence = _check(engine, _inferences(reqs[:2], alone))
    assert all(e.passed for e in evidence)


def test_prefill_attack_is_caught(engine: ReferenceEngine, model_home: Path) -> None:
    small = ensure_model("gonka-tiny-small", model_home, progress=False)
    cheap = ReferenceEngine(small.path, k=5, model_hash=small.content_hash)
    attack = PrefillAttackEngine(cheap=cheap, real=engine)
    reqs = _requests(engine, 1.0)
    evidence = _check(engine, _inferences(reqs, attack.generate(reqs)))
    # the reported logprobs are the real model's: the top-k check alone sees nothing ...
    assert max(e.topk_distance for e in evidence) <= 1e-3
    # ... the seeded sampling margin catches it
    assert sum(not e.passed for e in evidence) >= len(reqs) - 1
    assert all("sampling margin" in " ".join(e.reasons) for e in evidence if not e.passed)


def test_other_seed_and_other_temperature_are_caught(engine: ReferenceEngine) -> None:
    reqs = _requests(engine, 0.9)
    honest = _inferences(reqs, engine.generate(reqs))
    wrong_seed = [replace(r, seed=r.seed ^ 0xDEADBEEF) for r in reqs]
    claimed = [replace(i, output_ids=np.asarray(g.output_ids, np.int32),
                       token_logprobs=g.token_logprobs, topk_ids=g.topk_ids,
                       topk_logprobs=g.topk_logprobs, finish_reason=g.finish_reason)
               for i, g in zip(honest, engine.generate(wrong_seed))]
    assert sum(not e.passed for e in _check(engine, claimed)) >= len(reqs) - 1
    hot = [replace(r, params=SamplingParams(1.6, 1.0, 0)) for r in reqs]
    claimed = [replace(i, output_ids=np.asarray(g.output_ids, np.int32),
                       token_logprobs=g.token_logprobs, topk_ids=g.topk_ids,
                       topk_logprobs=g.topk_logprobs, finish_reason=g.finish_reason)
               for i, g in zip(honest, engine.generate(hot))]
    assert sum(not e.passed for e in _check(engine, claimed)) >= len(reqs) - 1


def test_one_edited_token_and_truncation_are_caught(engine: ReferenceEngine) -> None:
    reqs = _requests(engine, 0.8, max_tokens=24)
    honest = _inferences(reqs, engine.generate(reqs))
    edited = []
    for inf in honest:
        out = inf.output_ids.copy()
        pos = len(out) // 2
        out[pos] = (int(out[pos]) + 17) % 1500 + 100  # some other token
        edited.append(replace(inf, output_ids=out))
    assert all(not e.passed for e in _check(engine, edited))
    long_ones = [i for i in honest if i.finish_reason == "length"]
    assert long_ones, "need an output that ran to max_tokens"
    cut = [replace(i, output_ids=i.output_ids[:-3], token_logprobs=i.token_logprobs[:-3],
                   topk_ids=i.topk_ids[:-3], topk_logprobs=i.topk_logprobs[:-3])
           for i in long_ones]
    assert all("truncated" in " ".join(e.reasons) for e in _check(engine, cut))


def test_replayed_artifact_fails_binding(tmp_path: Path, engine: ReferenceEngine) -> None:
    reqs = _requests(engine, 0.9, max_tokens=12)
    infs = _inferences(reqs, engine.generate(reqs))
    shard = Shard("job-1", "job-1-uni-b", 1, "uni-b", "uni-a", "ee" * 32, "gonka-tiny",
                  engine.model_hash, 5, [ShardRequest(
                      r.request_id, i, r.request_id, "/v1/completions", list(r.prompt_ids),
                      r.max_tokens, r.params.temperature, r.params.top_p, r.params.top_k,
                      str(r.seed), [], None) for i, r in enumerate(reqs)])
    art = tmp_path / "b.h5"
    batch = write_batch(art, EXEC, epoch=1, job_id="job-1", shard_id="job-1-uni-b",
                        model_hash=engine.model_hash, engine="reference", engine_version="t",
                        dtype="float32", k=5, inferences=infs)
    assigned = {"job_id": "job-1", "shard_id": "job-1-uni-b", "executor": "uni-b",
                "request_ids": [r.request_id for r in reqs], "shard_hash": shard.sha256}
    committed = {"merkle_root": batch.header.merkle_root, "n_requests": len(reqs),
                 "n_tokens": batch.header.n_tokens, "model_hash": engine.model_hash,
                 "file_sha256": file_sha256(art)}
    kwargs = dict(artifact=art, shard=shard, assigned=assigned, committed=committed,
                  executor_pubkey=EXEC.public_hex, reputation=0, block_hash="ff" * 32, epoch=1)
    ok = verify_batch(VERIFIER, engine, TH, **kwargs)  # type: ignore[arg-type]
    assert ok.verdict.typed_body().passed and ok.verdict.typed_body().checked == len(reqs)
    ok.verdict.verify(VERIFIER.public_hex)
    # the same artifact presented for another shard of another epoch
    other = {**assigned, "shard_id": "job-2-uni-b", "job_id": "job-2"}
    bad = verify_batch(VERIFIER, engine, TH, **{**kwargs, "assigned": other,  # type: ignore[arg-type]
                                                "epoch": 2})
    assert not bad.verdict.typed_body().passed
    assert any("shard_id" in p for p in bad.binding_problems)
    assert any("epoch" in p for p in bad.binding_problems)
    # prompts swapped in the shard the ledger knows about
    swapped = replace(shard, requests=[replace(shard.requests[0], prompt_ids=[5, 6, 7]),
                                       *shard.requests[1:]])
    bad = verify_batch(VERIFIER, engine, TH, **{**kwargs, "shard": swapped,  # type: ignore[arg-type]
                                                "assigned": {**assigned,
                                                             "shard_hash": swapped.sha256}})
    assert any("prompt" in p for p in bad.binding_problems)
    # a shard file that is not the one the ledger recorded
    bad = verify_batch(VERIFIER, engine, TH, **{**kwargs, "shard": swapped})  # type: ignore[arg-type]
    assert any("shard hash" in p for p in bad.binding_problems)
    # over-billing: the commit claims more tokens than the artifact holds
    bad = verify_batch(VERIFIER, engine, TH, **{**kwargs, "committed": {  # type: ignore[arg-type]
        **committed, "n_tokens": committed["n_tokens"] + 50}})
    assert any("n_tokens" in p for p in bad.binding_problems)
    body = bad.verdict.typed_body()
    assert (body.passed, body.checked, body.failed) == (False, len(reqs), len(reqs))


def test_sampling_policy() -> None:
    assert sample_rate(0, 0.01) == 1.0
    assert sample_rate(1000, 0.01) == 0.01
    ids = [f"job:{i}" for i in range(2000)]
    assert len(sample_requests("aa" * 32, ids, 0, 0.01)) == 2000
    picked = sample_requests("aa" * 32, ids, 1000, 0.01)
    assert 5 <= len(picked) <= 45  # ~1% of 2000
    assert picked == sample_requests("aa" * 32, ids, 1000, 0.01)
    weights = {"uni-a": 10, "uni-b": 20, "dc-c": 30}
    verifiers = {assign_verifier("aa" * 32, f"s{i}", "dc-c", weights) for i in range(100)}
    assert verifiers == {"uni-a", "uni-b"}


def test_sampling_past_the_end_is_caught(engine: ReferenceEngine) -> None:
    """An executor that keeps sampling past EOS (to bill more tokens) or stops early fails."""
    reqs = _requests(engine, 0.9, max_tokens=64)
    honest = _inferences(reqs, engine.generate(reqs))
    stopped = [i for i in honest if i.finish_reason == "stop"]
    assert stopped, "need an output that ended on EOS"
    inf = stopped[0]
    # keep sampling with the same seed beyond EOS: every extra token has margin 0
    longer = engine.generate([replace(reqs[int(inf.request_id.split(":")[1])],
                                      max_tokens=len(inf.output_ids) + 8)])[0]
    assert list(longer.output_ids[:len(inf.output_ids)]) == list(inf.output_ids)
    past = replace(inf, max_tokens=len(inf.output_ids) + 8, finish_reason="length")
    ids = list(inf.output_ids) + [5] * 8
    past = replace(past, output_ids=np.asarray(ids, np.int32),
                   token_logprobs=np.zeros(len(ids), np.float32),
                   topk_ids=np.zeros((len(ids), 5), np.int32),
                   topk_logprobs=np.zeros((len(ids), 5), np.float32))
    (ev,) = _check(engine, [past])
    assert not ev.passed and any("past EOS" in r for r in ev.reasons)
    early = replace(inf, output_ids=inf.output_ids[:-2], token_logprobs=inf.token_logprobs[:-2],
                    topk_ids=inf.topk_ids[:-2], topk_logprobs=inf.topk_logprobs[:-2])
    (ev,) = _check(engine, [early])
    assert not ev.passed and any("neither EOS nor a stop string" in r for r in ev.reasons)


def test_malformed_artifacts_fail_without_crashing(engine: ReferenceEngine) -> None:
    reqs = _requests(engine, 0.9, max_tokens=12)
    (inf,) = _inferences(reqs[:1], engine.generate(reqs[:1]))
    rules = _rules(engine)
    bad_ids = replace(inf, output_ids=inf.output_ids.copy())
    bad_ids.output_ids[0] = engine.vocab_size + 7
    nan = replace(inf, topk_logprobs=np.full_like(inf.topk_logprobs, np.nan))
    narrow = replace(inf, topk_ids=inf.topk_ids[:, :2], topk_logprobs=inf.topk_logprobs[:, :2])
    empty = replace(inf, output_ids=inf.output_ids[:0], token_logprobs=inf.token_logprobs[:0],
                    topk_ids=inf.topk_ids[:0], topk_logprobs=inf.topk_logprobs[:0])
    from verify.scoring import check_shape

    assert any("vocabulary" in r for r in check_shape(bad_ids, rules))
    assert check_shape(nan, rules) == ["non-finite logprobs"]
    assert any("k=5" in r for r in check_shape(narrow, rules))
    assert check_shape(empty, rules) == ["empty output"]
    assert check_shape(inf, rules) == []
