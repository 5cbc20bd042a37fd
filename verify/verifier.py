"""Verify one committed artifact batch: binding, then re-scoring of the sampled inferences.

The result is a signed `verdict` record for the ledger, with an evidence summary; the full
per-inference evidence is returned for the caller to keep.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gonka_hpc.artifacts import ArtifactBatch, file_sha256, read_batch
from gonka_hpc.engines.base import Engine, decode
from gonka_hpc.errors import GonkaError, ValidationError
from gonka_hpc.identity import Identity
from gonka_hpc.records import SignedRecord, Verdict, sign_record
from gonka_hpc.spool import Shard

from .binding import check_binding
from .policy import sample_requests
from .scoring import InferenceEvidence, Rules, check_inference, check_shape
from .statistics import pool
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
    """Check one batch and sign the verdict as `verifier`.

    `assigned` and `committed` are the ledger's record bodies for the batch; `block_hash` is
    its sample block (the block holding the commit). A batch that is not bound to the ledger,
    or cannot be read or scored, fails whole: every request counts as checked and failed.
    """
    n_requests = int(committed["n_requests"])
    evidence: list[InferenceEvidence] = []
    try:
        batch = read_batch(artifact)
        problems = check_binding(batch, shard, assigned=assigned, committed=committed,
                                 executor_pubkey=executor_pubkey, model_hash=engine.model_hash,
                                 epoch=epoch, file_sha256=file_sha256(artifact))
        if not problems:
            evidence = _score(batch, shard, engine, th, reputation, block_hash)
    except (GonkaError, OSError) as exc:
        problems = [str(exc)]
    failed = [e for e in evidence if not e.passed]
    # the executor's checked inferences taken together (verify.statistics.pool): a cheat too
    # small to convict any one request still fails the batch when its positions add up
    pooled = pool([e.decision for e in evidence if e.decision is not None], th.margin_test)
    if not failed and not pooled.passed:  # the contributing inferences count as failed
        failed = [e for e in evidence if e.decision is not None and e.decision.over_floor]
    passed = not problems and not failed
    worst = max(evidence, key=lambda e: (not e.passed, e.max_margin), default=None)
    summary: dict[str, Any] = {
        "binding_problems": problems[:5], "thresholds": th.used(),
        "pooled": {"positions": pooled.n_positions, "over_floor": pooled.over_floor,
                   "p_value": float(f"{pooled.p_value:.3g}"), "passed": pooled.passed},
        "worst": worst.summary() if worst else None,
        "failed_requests": [e.request_id for e in failed][:20]}
    checked, n_failed = (n_requests, n_requests) if problems else (len(evidence), len(failed))
    body = Verdict(shard.job_id, shard.shard_id, shard.executor, committed["merkle_root"],
                   block_hash, checked, n_failed, passed, summary)
    return BatchCheck(sign_record(verifier, body), evidence, problems)


def _score(batch: ArtifactBatch, shard: Shard, engine: Engine, th: Thresholds,
           reputation: int, block_hash: str) -> list[InferenceEvidence]:
    """Re-score the sampled inferences; unscorable ones fail without reaching the engine."""
    picked = sample_requests(block_hash, [i.request_id for i in batch.inferences],
                             reputation, th.sample_rate_trusted)
    eos = int(engine.tokenizer.eos_token_id)
    evidence: dict[int, InferenceEvidence] = {}
    to_score = []
    for i in picked:
        inf, req = batch.inferences[i], shard.requests[i]
        rules = Rules(eos, engine.vocab_size, shard.k, tuple(req.stop),
                      lambda ids: decode(engine.tokenizer, ids))
        problems = check_shape(inf, rules)
        if not problems:
            try:
                engine.check_item(inf.prompt_ids.tolist(), inf.output_ids.tolist())
            except ValidationError as exc:
                problems = [str(exc)]
        if problems:
            evidence[i] = InferenceEvidence(inf.request_id, int(inf.output_ids.size),
                                            float("inf"), 0, float("inf"), float("inf"), False,
                                            problems)
        else:
            to_score.append((i, rules))
    scorings = engine.score([(batch.inferences[i].prompt_ids.tolist(),
                              batch.inferences[i].output_ids.tolist()) for i, _ in to_score])
    for (i, rules), sc in zip(to_score, scorings):
        evidence[i] = check_inference(batch.inferences[i], sc, th, rules)
    return [evidence[i] for i in picked]
