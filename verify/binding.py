"""Binding: the artifact must be the one the ledger says was assigned and committed.

It catches replayed and transplanted artifacts: another request's or epoch's batch, prompts
that are not the assigned ones, other sampling parameters or seeds, another model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from gonka_hpc.artifacts import ArtifactBatch
from gonka_hpc.errors import SignatureError
from gonka_hpc.spool import Shard


def check_binding(batch: ArtifactBatch, shard: Shard, *, assigned: Mapping[str, Any],
                  committed: Mapping[str, Any], executor_pubkey: str, model_hash: str,
                  epoch: int, file_sha256: str) -> list[str]:
    """Every way the batch disagrees with the ledger and the shard; empty when bound.

    `assigned` and `committed` are the bodies of the ledger's `inference_assigned` and
    `artifact_batch_committed` records; `file_sha256` is the artifact file's hash.
    """
    problems: list[str] = []
    if file_sha256 != committed["file_sha256"]:
        problems.append("artifact file is not the committed one (sha256 differs)")
    try:
        batch.verify(executor_pubkey)
    except SignatureError as exc:
        problems.append(str(exc))
    h = batch.header
    if shard.sha256 != assigned["shard_hash"]:
        problems.append("shard file does not match the assigned shard hash")
    for name, want, got in (("executor", assigned["executor"], h.executor),
                            ("job_id", assigned["job_id"], h.job_id),
                            ("shard_id", assigned["shard_id"], h.shard_id),
                            ("epoch", epoch, h.epoch),
                            ("model_hash", model_hash, h.model_hash),
                            ("k", shard.k, h.k),
                            ("committed model_hash", committed["model_hash"], h.model_hash),
                            ("merkle_root", committed["merkle_root"], h.merkle_root),
                            ("n_requests", committed["n_requests"], h.n_requests),
                            ("n_tokens", committed["n_tokens"], h.n_tokens)):
        if want != got:
            problems.append(f"{name}: artifact says {got!r}, ledger says {want!r}")
    rids = [inf.request_id for inf in batch.inferences]
    if rids != list(assigned["request_ids"]):
        problems.append("request ids differ from the assigned ones")
        return problems
    for inf, req in zip(batch.inferences, shard.requests):
        diffs = []
        if not np.array_equal(inf.prompt_ids, np.asarray(req.prompt_ids, np.int32)):
            diffs.append("prompt")
        if inf.seed != int(req.seed):
            diffs.append("seed")
        if (inf.temperature, inf.top_p, inf.top_k, inf.max_tokens) != \
                (req.temperature, req.top_p, req.top_k, req.max_tokens):
            diffs.append("sampling parameters")
        if inf.min_tokens != req.min_tokens:
            diffs.append(f"min_tokens ({inf.min_tokens}, assigned {req.min_tokens})")
        if diffs:
            problems.append(f"{inf.request_id}: {', '.join(diffs)} differ from the assignment")
    return problems
