"""The statistical decision (verify.statistics) and the per-class thresholds file.

Pure arithmetic, no model (the fast margin path is checked against sampling_margins on random
logprobs): the binomial tail against brute-force enumeration, the critical
count, the Clopper-Pearson bound against the rule of three, the decision's two rules (a margin
over the hard bound fails alone; positions over the floor fail by count with p < alpha), pooling
that catches a cheater no single request convicts, and per-class loading of the thresholds file.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from gonka_hpc.config import REPO_ROOT
from gonka_hpc.errors import ValidationError
from gonka_hpc.sampling import SamplingParams, sampling_margins, select_token
from verify.scoring import margins
from verify.statistics import (
    MarginTest,
    binom_tail,
    critical_count,
    decide,
    detection_over,
    pool,
    rate_upper_bound,
)
from verify.thresholds import load_file, load_thresholds

TEST = MarginTest(sampling_margin=0.01, margin_floor=0.001, floor_rate=1e-3, alpha=1e-6)


@pytest.mark.parametrize("n, p", [(5, 0.3), (8, 0.01), (12, 0.5)])
def test_binom_tail_matches_enumeration(n: int, p: float) -> None:
    for c in range(n + 2):
        brute = sum(p ** sum(bits) * (1 - p) ** (n - sum(bits))
                    for bits in itertools.product((0, 1), repeat=n) if sum(bits) >= c)
        assert binom_tail(c, n, p) == pytest.approx(brute, rel=1e-9, abs=1e-15)


def test_critical_count_grows_with_length_and_rate() -> None:
    assert binom_tail(critical_count(64, 1e-3, 1e-6), 64, 1e-3) < 1e-6
    assert binom_tail(critical_count(64, 1e-3, 1e-6) - 1, 64, 1e-3) >= 1e-6
    assert critical_count(8, 1e-3, 1e-6) <= critical_count(64, 1e-3, 1e-6)
    assert critical_count(64, 1e-5, 1e-6) < critical_count(64, 1e-2, 1e-6)
    assert critical_count(3, 0.5, 1e-6) == 4  # too short to ever fail on count


def test_rate_upper_bound_is_the_rule_of_three_with_no_events() -> None:
    assert rate_upper_bound(0, 10_000) == pytest.approx(-math.log(0.05) / 10_000, rel=1e-3)
    ub = rate_upper_bound(5, 1000)
    assert 0.005 < ub < 0.02
    assert 1 - binom_tail(6, 1000, ub) == pytest.approx(0.05, abs=1e-6)  # P[X <= 5] = 5%


def test_decision_rules() -> None:
    honest = decide(np.zeros(64), TEST)
    assert honest.passed and honest.p_value == 1.0 and honest.over_floor == 0
    one_flip = decide(np.r_[np.zeros(63), 0.005], TEST)  # one near-tie flip: honest noise
    assert one_flip.passed and one_flip.over_floor == 1 and one_flip.over_max == 0
    big = decide(np.r_[np.zeros(63), 0.5], TEST)  # impossible under the class's noise
    assert not big.passed and big.p_value == 0.0 and big.over_max == 1
    many = decide(np.r_[np.zeros(56), np.full(8, 0.005)], TEST)  # too many small ones
    assert not many.passed and many.over_max == 0 and many.p_value < TEST.alpha
    assert many.over_floor >= many.critical_count
    assert not decide(np.r_[np.zeros(10), np.inf], TEST).passed
    # a short output needs as many (or more) positions over the floor, as a share of its length
    assert decide(np.zeros(8), TEST).critical_count / 8 >= \
        decide(np.zeros(64), TEST).critical_count / 64


def test_pooling_catches_what_no_single_request_shows() -> None:
    rng = np.random.default_rng(0)
    ds = []
    for _ in range(40):  # 2 small flips per request: each request passes on its own
        m = np.zeros(64)
        m[rng.choice(64, 2, replace=False)] = 0.004
        ds.append(decide(m, TEST))
    assert all(d.passed for d in ds)
    pooled = pool(ds, TEST)
    assert not pooled.passed and pooled.n_failed == 0 and pooled.p_value < TEST.alpha
    honest = pool([decide(np.zeros(64), TEST) for _ in range(40)], TEST)
    assert honest.passed
    assert detection_over(0.9, 3) == pytest.approx(0.999)


def test_thresholds_per_precision_class(tmp_path: Path) -> None:
    path = REPO_ROOT / "configs" / "verification.yaml"
    doc = load_file(path)
    assert {"float32", "bfloat16"} <= set(doc.classes)
    fp32, bf16 = load_thresholds(path), load_thresholds(path, "bfloat16")
    assert fp32.precision == doc.precision == "float32"
    assert bf16.precision == "bfloat16"
    # bf16 arithmetic noise is larger: its class must tolerate more than fp32's
    assert bf16.sampling_margin > fp32.sampling_margin
    assert fp32.margin_test.alpha == doc.alpha
    with pytest.raises(ValidationError) as exc:
        load_thresholds(path, "int3")
    assert exc.value.field == "precision" and exc.value.file == str(path)
    bad = tmp_path / "v.yaml"
    bad.write_text(path.read_text().replace("precision: float32", "precision: fp8"))
    with pytest.raises(ValidationError, match="no class thresholds"):
        load_thresholds(bad)


@pytest.mark.parametrize("params", [SamplingParams(0.0), SamplingParams(1.0),
                                    SamplingParams(0.7, 0.9), SamplingParams(1.0, 0.8, 20),
                                    SamplingParams(1.3, 1.0, 5)])
def test_fast_margins_equal_the_reference(params: SamplingParams) -> None:
    """verify.scoring.margins takes a shortcut; it must agree with sampling_margins exactly."""
    g = torch.Generator().manual_seed(1)
    lp = torch.log_softmax(torch.randn(48, 300, generator=g) * 4, dim=-1)
    seed = 987654321
    honest = [select_token(lp[i], seed, i, params) for i in range(48)]
    other = torch.randint(0, 300, (48,), generator=g).tolist()
    mixed = [o if i % 3 == 0 else h for i, (h, o) in enumerate(zip(honest, other))]
    for chosen in (honest, mixed):
        ref = sampling_margins(lp, chosen, seed, params, 0.01, 0.005)
        fast = margins(lp, chosen, seed, params, 0.01, 0.005)
        np.testing.assert_array_equal(fast, ref)
    assert not np.any(margins(lp, honest, seed, params, 0.01, 0.005))
