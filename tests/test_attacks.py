"""The attack suite (verify.attacks) against the checks, on the real local model.

A CI-sized sample of the calibration: 12 requests from the calibration's prompt and sampling
mix, 32 output tokens. Every attack class is generated for real (gonka-tiny-small, int8/int4
fake-quantized and bf16 copies of gonka-tiny, other temperature / top_p / seed, one edited
token, noisy logprobs, a replay from another epoch, truncation) and judged with the thresholds
of configs/verification.yaml. An attack may reproduce the honest output exactly (another seed
at T = 0): those are correct work; every artifact that differs must fail (one slip allowed for
the sampling attacks, whose full-size rates are measured by `python -m verify.calibrate`).
Cheaters that report their own model's logprobs (smaller model, int8, int4, bf16) must all fail
in the float32 class, even where their tokens match.
Honest artifacts pass in both precision classes, and bf16 executors pass in the bf16 class.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from gonka_hpc.artifacts import Inference
from gonka_hpc.config import REPO_ROOT
from gonka_hpc.engines.base import decode
from gonka_hpc.engines.reference import ReferenceEngine
from verify.attacks import ATTACKS, AttackSuite, inference_of, prefix, truncate
from verify.calibrate import make_requests
from verify.quantize import fake_quantize_, quantize_model_
from verify.scoring import InferenceEvidence, Rules, check_inference
from verify.thresholds import Thresholds, load_thresholds

CONFIG = REPO_ROOT / "configs" / "verification.yaml"
FP32 = load_thresholds(CONFIG)
BF16 = load_thresholds(CONFIG, "bfloat16")
ALWAYS_DIFFER = ("edit1", "logprob_noise", "truncated")
OWN_LOGPROBS = ("smaller_model", "int8", "int4", "bf16")
"""Cheaters that report their own model's logprobs: every artifact differs from the real one."""


@pytest.fixture(scope="module")
def engine(tiny_model) -> ReferenceEngine:  # type: ignore[no-untyped-def]
    return ReferenceEngine(tiny_model.path, k=5, model_hash=tiny_model.content_hash,
                           max_batch_size=16)


@pytest.fixture(scope="module")
def work(engine: ReferenceEngine, model_home):  # type: ignore[no-untyped-def]
    reqs = make_requests(engine.tokenizer, 12, 11, "t", max_tokens=32)
    honest = [inference_of(r, g) for r, g in zip(reqs, engine.generate(reqs))]
    return reqs, honest, AttackSuite(engine, model_home, seed=5)


def _rules(engine: ReferenceEngine) -> Rules:
    return Rules(engine.eos_id, engine.vocab_size, 5, (), lambda ids: decode(engine.tokenizer, ids))


def _check(engine: ReferenceEngine, infs: list[Inference],
           th: Thresholds) -> list[InferenceEvidence]:
    scores = engine.score([(i.prompt_ids.tolist(), i.output_ids.tolist()) for i in infs])
    return [check_inference(i, s, th, _rules(engine)) for i, s in zip(infs, scores)]


def test_honest_passes_in_both_classes(engine: ReferenceEngine, work) -> None:  # type: ignore[no-untyped-def]
    _, honest, _ = work
    for th in (FP32, BF16):
        ev = _check(engine, honest, th)
        assert all(e.passed for e in ev), [e.reasons for e in ev if not e.passed]
    e = _check(engine, honest[:1], FP32)[0]
    # the evidence carries the measured values, the test's verdict and the thresholds used
    assert e.decision is not None and e.decision.n_positions == e.n_tokens
    assert e.thresholds["margin_floor"] == FP32.margin_floor
    assert e.summary()["critical_count"] == e.decision.critical_count


@pytest.mark.parametrize("attack", ATTACKS)
def test_attack_is_caught(engine: ReferenceEngine, work, attack: str) -> None:  # type: ignore[no-untyped-def]
    reqs, honest, suite = work
    claimed = suite.run(attack, reqs, honest)
    assert [c.request_id for c in claimed] == [r.request_id for r in reqs]
    # the cheater claims the assignment: seed and parameters are the ledger's
    assert all((c.seed, c.temperature, c.top_p) == (h.seed, h.temperature, h.top_p)
               for c, h in zip(claimed, honest))
    if attack == "truncated":
        claimed = [c for c, h in zip(claimed, honest) if c.output_ids.size < h.output_ids.size]
    pairs = [(c, h) for c, h in zip(claimed, honest)
             if attack in ALWAYS_DIFFER + OWN_LOGPROBS
             or not np.array_equal(c.output_ids, h.output_ids)]
    ev = _check(engine, [c for c, _ in pairs], FP32)
    caught = sum(not e.passed for e in ev)
    if attack in ALWAYS_DIFFER + OWN_LOGPROBS:
        assert pairs and caught == len(pairs), [e.summary() for e in ev if e.passed]
    else:
        assert len(pairs) >= 3, f"{attack}: too few outputs differ to test"
        assert caught >= len(pairs) - 1, [e.summary() for e in ev if e.passed]
    if attack == "prefill":  # the real model's logprobs: only the sampling test sees it
        assert max(e.topk_distance for e in ev) <= FP32.topk_distance
        assert all("sampling margin" in " ".join(e.reasons) for e in ev if not e.passed)


def test_bf16_executor_is_honest_in_the_bf16_class(engine: ReferenceEngine, work) -> None:  # type: ignore[no-untyped-def]
    reqs, honest, suite = work
    bf16 = suite.run("bf16", reqs, honest)
    ev = _check(engine, bf16, BF16)
    assert all(e.passed for e in ev), [e.reasons for e in ev if not e.passed]


def test_prefix_and_truncate() -> None:
    n = 10
    inf = Inference("r", np.arange(3, dtype=np.int32), np.arange(n, dtype=np.int32),
                    np.zeros(n, np.float32), np.zeros((n, 5), np.int32),
                    np.zeros((n, 5), np.float32), 1, 1.0, 1.0, 0, n, "length")
    p = prefix(inf, 4)
    assert p.output_ids.tolist() == [0, 1, 2, 3] and p.max_tokens == 4
    assert p.finish_reason == "length" and p.topk_ids.shape == (4, 5)
    assert prefix(inf, 16).max_tokens == 16 and prefix(inf, 16).output_ids.size == n
    t = truncate(inf)
    assert t.output_ids.size == 8 and t.max_tokens == n and t.finish_reason == "length"


def test_fake_quantization() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 64, generator=g)
    errs = {}
    for bits in (8, 4):
        q = fake_quantize_(w.clone(), bits)
        scale = w.abs().amax(dim=1, keepdim=True) / (2 ** (bits - 1) - 1)
        assert torch.all((q - w).abs() <= scale / 2 + 1e-6)
        for row in range(16):  # at most 2^bits - 1 levels per output channel
            assert len(torch.unique(q[row])) <= 2 ** bits - 1
        errs[bits] = float((q - w).abs().mean())
    assert 0 < errs[8] < errs[4]
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    before = model[0].weight.detach().clone()
    assert quantize_model_(model, "int4") == 2
    assert not torch.equal(before, model[0].weight)
    with pytest.raises(ValueError, match="scheme"):
        quantize_model_(model, "int3")


def test_wrong_or_repeated_topk_ids_are_caught(engine: ReferenceEngine, work) -> None:  # type: ignore[no-untyped-def]
    """Logprobs that are right for the ids claimed are not enough: the ids must be the top k."""
    _, honest, _ = work
    inf = max(honest, key=lambda i: i.output_ids.size)
    (sc,) = engine.score([(inf.prompt_ids.tolist(), inf.output_ids.tolist())])
    full = sc.full_logprobs.numpy()
    order = np.argsort(-full, axis=1)
    low = order[:, 5:10].astype(np.int32)  # ranks 6..10, reported with their true logprobs
    wrong = replace(inf, topk_ids=low,
                    topk_logprobs=np.take_along_axis(full, low, axis=1).astype(np.float32))
    repeated = replace(inf, topk_ids=np.repeat(inf.topk_ids[:, :1], 5, axis=1),
                       topk_logprobs=np.repeat(inf.topk_logprobs[:, :1], 5, axis=1))
    ev_wrong, ev_rep = _check(engine, [wrong, repeated], FP32)
    assert not ev_wrong.passed and any("top-k distance" in r for r in ev_wrong.reasons)
    assert not ev_rep.passed and any("repeat" in r for r in ev_rep.reasons)
