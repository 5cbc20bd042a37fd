"""Every random choice of the network, derived from a finalized block hash.

Executor choice, verification sampling, verifier assignment and sampling seeds all come from
sha256 over the canonical (block hash, purpose, labels), so anyone holding the chain can replay
them offline, and nobody can steer them once the block is final.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Mapping, Sequence

from .canonical import canonical_bytes


def draw(block_hash: str, purpose: str, *labels: str) -> int:
    """A 256-bit integer, uniform, fixed by the block hash, the purpose and the labels."""
    data = canonical_bytes({"v": 1, "block": block_hash, "purpose": purpose,
                            "labels": list(labels)})
    return int.from_bytes(hashlib.sha256(data).digest(), "big")


def uniform(block_hash: str, purpose: str, *labels: str) -> float:
    """A float in [0, 1) from `draw` (53 bits)."""
    return (draw(block_hash, purpose, *labels) >> 203) / float(1 << 53)


def weighted_choice(block_hash: str, purpose: str, label: str,
                    candidates: Sequence[tuple[str, int]]) -> str:
    """Pick a name with probability proportional to its weight, deterministically.

    Candidates are sorted by name first, so the caller's order does not matter.
    """
    items = sorted((n, w) for n, w in candidates if w > 0)
    if not items:
        raise ValueError("no candidate with positive weight")
    total = sum(w for _, w in items)
    point = draw(block_hash, purpose, label) % total
    for name, weight in items:
        if point < weight:
            return name
        point -= weight
    raise AssertionError("unreachable")


def choose_executor(block_hash: str, request_id: str, ta: str,
                    weights: Mapping[str, int]) -> str:
    """The executor of a request: by weight, never the transfer agent's own participant.

    The TA uses it to assign, and validators use it to check the assignment.
    """
    return weighted_choice(block_hash, "executor", request_id,
                           [(n, w) for n, w in weights.items() if n != ta])


def choose_verifier(block_hash: str, shard_id: str, executor: str,
                    weights: Mapping[str, int]) -> str:
    """The verifier of a batch: by weight, never its executor. Validators check it."""
    return weighted_choice(block_hash, "verifier", shard_id,
                           [(n, w) for n, w in weights.items() if n != executor])


def choose_panel(block_hash: str, shard_id: str, exclude: Collection[str],
                 weights: Mapping[str, int], size: int) -> list[str]:
    """The dispute panel of a batch: up to `size` distinct participants, drawn one at a time
    by weight without replacement, none in `exclude` (its executor and first verifier).

    Returns fewer than `size` names (maybe none) when fewer are eligible; the order is the
    draw order. Validators check every dispute vote against it.
    """
    pool = {n: w for n, w in weights.items() if n not in exclude and w > 0}
    panel: list[str] = []
    while pool and len(panel) < size:
        name = weighted_choice(block_hash, "dispute-panel", f"{shard_id}#{len(panel)}",
                               list(pool.items()))
        panel.append(name)
        del pool[name]
    return panel
