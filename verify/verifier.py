"""Verify one committed artifact batch: binding, then re-scoring of the sampled inferences.

The result is a signed `verdict` record for the ledger, with an evidence summary; the full
per-inference evidence is returned for the caller to keep.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gonka_hpc.artifacts import read_batch
from gonka_hpc.engines.base import Engine
from gonka_hpc.errors import GonkaError
from gonka_hpc.identity import Identity
from gonka_hpc.records import SignedRecord, Verdict, sign_record
from gonka_hpc.spool import Shard

from .binding import check_binding
from .policy import sample_requests
from .scoring import InferenceEvidence, check_inference
from .thresholds import Thresholds


@dataclass(frozen=True)
class BatchCheck:
    verdict: SignedRecord
    evidence: list[InferenceEvidence]
    binding_problems: list[str]


def verify_batch(verifier: Identity, engine: Engine, th: Thresholds, *, artifact: Path,
                 shard: Shard, assigned: Mapping[str, Any], committed: Mapping[str, Any],
                 executor_pubkey: str, reputation: int, block_hash: str,
                 epoch: int) -> BatchCheck:
    """Check one batch and sign the verdict as `verifier`."""
    try:
        batch = read_batch(artifact)
        problems = check_binding(batch, shard, assigned=assigned, committed=committed,
                                 executor_pubkey=executor_pubkey, model_hash=engine.model_hash,
                                 epoch=epoch)
    except GonkaError as exc:
        batch, problems = None, [str(exc)]
    evidence: list[InferenceEvidence] = []
    if batch is not None and not problems:
        picked = sample_requests(block_hash, [i.request_id for i in batch.inferences],
                                 reputation, th.sample_rate_trusted)
        infs = [batch.inferences[i] for i in picked]
        scorings = engine.score([(inf.prompt_ids.tolist(), inf.output_ids.tolist())
                                 for inf in infs])
        evidence = [check_inference(inf, sc, th) for inf, sc in zip(infs, scorings)]
    failed = [e for e in evidence if not e.passed]
    passed = not problems and not failed
    worst = max(evidence, key=lambda e: (not e.passed, e.max_margin), default=None)
    summary: dict[str, Any] = {
        "binding_problems": problems[:5], "thresholds": {
            "sampling_margin": th.sampling_margin, "topk_distance": th.topk_distance,
            "sampled_logprob": th.sampled_logprob, "precision": th.precision},
        "worst": worst.summary() if worst else None,
        "failed_requests": [e.request_id for e in failed][:20]}
    body = Verdict(shard.job_id, shard.shard_id, shard.executor, committed["merkle_root"],
                   block_hash, len(evidence), len(failed) + (1 if problems else 0), passed, summary)
    return BatchCheck(sign_record(verifier, body), evidence, problems)
