"""Who checks what: the sample of inferences and the verifier of each batch.

Both come from the finalized block hash, so an executor cannot know in advance which of its
inferences will be checked, and anyone can replay the choice. A participant with reputation 0
(new, or caught before) is checked on 100% of its work; a trusted one on a small share that
shrinks with reputation down to `sample_rate_trusted`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from gonka_hpc.randomness import choose_verifier, uniform


def sample_rate(reputation: int, trusted_rate: float) -> float:
    if reputation <= 0:
        return 1.0
    return max(trusted_rate, 1.0 / (1 + reputation))


def sample_requests(block_hash: str, request_ids: Sequence[str], reputation: int,
                    trusted_rate: float) -> list[int]:
    """Indices of the requests to re-score."""
    rate = sample_rate(reputation, trusted_rate)
    return [i for i, rid in enumerate(request_ids)
            if rate >= 1.0 or uniform(block_hash, "verify-sample", rid) < rate]


def assign_verifier(block_hash: str, shard_id: str, executor: str,
                    weights: Mapping[str, int]) -> str:
    """A participant other than the executor, chosen by weight (validators check the same
    choice with `gonka_hpc.randomness.choose_verifier`)."""
    return choose_verifier(block_hash, shard_id, executor, weights)
