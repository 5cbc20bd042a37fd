"""Who proposes at (height, round): weighted round-robin, a pure function of the two.

The sequence is the "smooth weighted round-robin" that CometBFT's proposer priority uses
without its history: every step each validator's priority grows by its weight, the highest
priority (lowest index on ties) proposes and pays back the total weight. After one cycle of
`sum(weights)` steps every validator has proposed exactly `weight` times, spread out evenly,
and all priorities are back to zero, so the cycle repeats. Position `(height + round) mod
total` of the cycle proposes. With equal weights this is `validators[(height + round) % n]`.

The cycle is computed once per validator set (weights divided by their gcd, so a set
weighted 10/20/30 has a cycle of 6, not 60).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache
from math import gcd
from typing import Any

MAX_CYCLE = 1_000_000  # validator sets whose reduced weights sum to more are refused


@lru_cache(maxsize=16)
def _cycle(weights: tuple[int, ...]) -> tuple[int, ...]:
    g = 0
    for w in weights:
        g = gcd(g, w)
    reduced = [w // g for w in weights]
    total = sum(reduced)
    if total > MAX_CYCLE:
        raise ValueError(f"validator weights sum to {total} after dividing by their gcd; "
                         f"at most {MAX_CYCLE} supported")
    prio = [0] * len(reduced)
    out = []
    for _ in range(total):
        for i, w in enumerate(reduced):
            prio[i] += w
        best = max(range(len(prio)), key=lambda i: (prio[i], -i))
        prio[best] -= total
        out.append(best)
    return tuple(out)


def proposer_cycle(validators: Sequence[Mapping[str, Any]]) -> tuple[int, ...]:
    """The indices of one full cycle of proposers."""
    weights = tuple(int(v["weight"]) for v in validators)
    if not weights or any(w <= 0 for w in weights):
        raise ValueError("validator weights must be positive")
    return _cycle(weights)


def proposer_index(validators: Sequence[Mapping[str, Any]], height: int, round_: int) -> int:
    """The index (in genesis order) of the proposer of (height, round)."""
    cycle = proposer_cycle(validators)
    return cycle[(height + round_) % len(cycle)]
