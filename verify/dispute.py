"""Dispute re-checks: a panel member re-runs a failed batch's check and signs its vote.

A failing verdict opens a dispute on its batch (`ledger/state.py`). The panel is drawn from the
hash of the block that holds the verdict (`gonka_hpc.randomness.choose_panel`). Each member
runs the very check the first verifier ran, `verify_batch` on the same sample (the batch's
sample block), and signs a `dispute_vote` with its counts, its evidence summary and that
summary's digest. The ledger counts the votes: more than 2/3 of the panel's weight decides.

Nothing here decides anything: the vote is one member's measured evidence; the rule that
turns votes into an outcome lives in the state machine, where every validator applies it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gonka_hpc.engines.base import Engine
from gonka_hpc.identity import Identity
from gonka_hpc.records import DisputeVote, SignedRecord, evidence_digest, sign_record
from gonka_hpc.spool import Shard

from .scoring import InferenceEvidence
from .thresholds import Thresholds
from .verifier import verify_batch


@dataclass(frozen=True)
class DisputeCheck:
    """A panel member's signed vote and the per-inference evidence behind it."""

    vote: SignedRecord
    evidence: list[InferenceEvidence]
    binding_problems: list[str]


def recheck(member: Identity, engine: Engine, th: Thresholds, *, artifact: Path,
            shard: Shard, assigned: Mapping[str, Any], committed: Mapping[str, Any],
            executor_pubkey: str, reputation: int, sample_block: str, dispute_block: str,
            epoch: int) -> DisputeCheck:
    """Re-check one disputed batch as panel member `member` and sign the vote.

    The arguments are `verify_batch`'s (`sample_block` is its `block_hash`), plus
    `dispute_block`, the hash of the block holding the failing verdict, which the vote names.
    """
    check = verify_batch(member, engine, th, artifact=artifact, shard=shard,
                         assigned=assigned, committed=committed,
                         executor_pubkey=executor_pubkey, reputation=reputation,
                         block_hash=sample_block, epoch=epoch)
    v = check.verdict.typed_body()
    evidence = dict(v.evidence)
    body = DisputeVote(v.job_id, v.shard_id, v.executor, v.merkle_root, sample_block,
                       dispute_block, v.checked, v.failed, v.passed, evidence_digest(evidence),
                       evidence)
    return DisputeCheck(sign_record(member, body), check.evidence, check.binding_problems)
