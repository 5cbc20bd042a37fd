"""The statistical decision: one test per inference over all its positions, and pooling.

A precision class (fp32, bf16, ...) bounds how far honest arithmetic noise can move a token
choice. Two facts follow, and the test uses both:

- A margin above `sampling_margin` (the class's largest honest margin, with headroom) cannot come
  from honest noise: one such position fails the inference outright (p-value 0).
- A margin above the smaller `margin_floor` can, rarely: honest noise flips near-ties. The
  calibration bounds the per-position rate `floor_rate` of such flips. Under honest noise the
  number of positions over the floor among n is at most Binomial(n, floor_rate), so the inference
  fails when that count's tail probability is below `alpha`. This bounds the false-positive rate
  of the count rule by `alpha` at every output length, and makes the test's power on short outputs
  explicit: `critical_count(n)` positions over the floor are needed to fail an n-token output on
  count alone.

Pooling per executor and epoch adds the counts and positions of every checked inference and
applies the same tail test, so a participant who cheats a little on many requests is caught even
when no single request is. `detection_over` gives the chance that at least one of m sampled
cheating requests fails, from a per-request detection rate.

Limit: the binomial model assumes honest flips are independent across positions; calibration
checks the claimed rate against ≥ 10^4 honest inferences rather than trusting the model alone.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np


def binom_tail(count: int, n: int, p: float) -> float:
    """P[Binomial(n, p) >= count], computed in log space (exact, no scipy needed)."""
    if count <= 0:
        return 1.0
    if count > n:
        return 0.0
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    lp, lq = math.log(p), math.log1p(-p)
    terms = [math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * lp
             + (n - k) * lq for k in range(count, n + 1)]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


@lru_cache(maxsize=4096)
def critical_count(n: int, p: float, alpha: float) -> int:
    """Fewest positions over the floor that fail an n-position output (n + 1: never)."""
    for c in range(1, n + 1):
        if binom_tail(c, n, p) < alpha:
            return c
    return n + 1


def rate_upper_bound(events: int, trials: int, confidence: float = 0.95) -> float:
    """One-sided upper confidence bound on a rate from `events` in `trials` (Clopper-Pearson).

    With no events this is the "rule of three" (about 3 / trials at 95%).
    """
    if trials <= 0:
        return 1.0
    if events >= trials:
        return 1.0
    target = 1.0 - confidence
    lo, hi = events / trials, 1.0
    for _ in range(100):  # bisection on P[Binomial(trials, p) <= events] = target
        mid = (lo + hi) / 2
        if 1.0 - binom_tail(events + 1, trials, mid) > target:
            lo = mid
        else:
            hi = mid
    return hi


@dataclass(frozen=True)
class MarginTest:
    """The test's parameters for one precision class (from `configs/verification.yaml`)."""

    sampling_margin: float
    """Hard bound: a margin above it is impossible under the class's honest noise."""
    margin_floor: float
    """Noise floor: margins above it are counted."""
    floor_rate: float
    """Upper bound on the honest per-position rate of margins above the floor."""
    alpha: float
    """Largest false-positive probability the count rule may have per inference."""


@dataclass(frozen=True)
class MarginDecision:
    """What the test measured on one inference and what it decided."""

    n_positions: int
    max_margin: float
    over_max: int
    """Positions whose margin exceeds the hard bound (any one fails)."""
    over_floor: int
    """Positions whose margin exceeds the noise floor (the count statistic)."""
    p_value: float
    """P[honest noise gives a result at least this extreme]; 0 when a margin is over the bound."""
    critical_count: int
    """Positions over the floor that would fail this inference on count alone (n + 1: never)."""
    passed: bool

    def summary(self) -> dict:
        return {"n_positions": self.n_positions, "max_margin": _num(self.max_margin),
                "over_max": self.over_max, "over_floor": self.over_floor,
                "p_value": float(f"{self.p_value:.3g}"), "critical_count": self.critical_count,
                "passed": self.passed}


def _num(x: float) -> float | str:
    return round(float(x), 6) if math.isfinite(x) else "inf"


def decide(margins: np.ndarray, test: MarginTest) -> MarginDecision:
    """Apply the test to one inference's per-position margins (non-finite counts as over)."""
    m = np.asarray(margins, dtype=np.float64)
    m = np.where(np.isfinite(m), m, np.inf)
    n = int(m.size)
    max_margin = float(m.max()) if n else 0.0
    over_max = int(np.sum(m > test.sampling_margin))
    over_floor = int(np.sum(m > test.margin_floor))
    p = 0.0 if over_max else binom_tail(over_floor, n, test.floor_rate)
    crit = critical_count(n, test.floor_rate, test.alpha)
    return MarginDecision(n, max_margin, over_max, over_floor, p, crit,
                          over_max == 0 and p >= test.alpha)


@dataclass(frozen=True)
class PooledDecision:
    """One executor's checked inferences in one epoch, taken together."""

    n_inferences: int
    n_failed: int
    n_positions: int
    over_floor: int
    p_value: float
    """Tail probability of the pooled count under honest noise (0 if any margin is over max)."""
    passed: bool


def pool(decisions: Iterable[MarginDecision], test: MarginTest) -> PooledDecision:
    """Pool per-inference decisions: fails if any fails, or if the summed count is too rare."""
    ds = list(decisions)
    n = sum(d.n_positions for d in ds)
    over = sum(d.over_floor for d in ds)
    failed = sum(not d.passed for d in ds)
    hard = any(d.over_max for d in ds)
    p = 0.0 if hard else binom_tail(over, n, test.floor_rate)
    return PooledDecision(len(ds), failed, n, over, p, failed == 0 and p >= test.alpha)


def detection_over(rate: float, m: int) -> float:
    """Chance at least one of m independently sampled cheating requests is caught."""
    return 1.0 - (1.0 - rate) ** m
