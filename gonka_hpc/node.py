"""The ML-node worker: runs the shards waiting in an executor's spool.

For each shard not yet done it generates every request with the engine (seeded verifiable
sampling), writes the output lines and one signed HDF5 artifact batch, posts the batch's
`artifact_batch_committed` record, and writes the `.done` marker last. It is resumable: a
restarted worker skips done shards, and a shard whose artifact is already whole is committed
from that file instead of being generated again, so no request is answered twice.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .artifacts import Inference, file_sha256, read_batch, write_batch
from .engines.base import Engine, Generation, GenerationRequest
from .errors import GonkaError
from .fileutil import atomic_write_bytes, atomic_write_text
from .identity import Identity
from .jobfile import response_line
from .records import ArtifactBatchCommitted, SignedRecord, sign_record
from .sampling import SamplingParams
from .spool import Shard, ShardRequest, Spool


@dataclass(frozen=True)
class ShardResult:
    shard_id: str
    n_requests: int
    n_tokens: int
    merkle_root: str
    resumed: bool  # True when the artifact already existed and was only committed


def _gen_request(r: ShardRequest) -> GenerationRequest:
    return GenerationRequest(r.request_id, tuple(r.prompt_ids), r.max_tokens,
                             SamplingParams(r.temperature, r.top_p, r.top_k), int(r.seed),
                             tuple(r.stop))


def _output_line(r: ShardRequest, g: Generation, engine: Engine, model: str,
                 executor: str) -> dict:
    toks = lps = top = None
    if r.top_logprobs is not None:
        dec = engine.tokenizer.decode
        toks = [dec([int(t)]) for t in g.output_ids]
        lps = [float(x) for x in g.token_logprobs]
        top = [[(dec([int(i)]), float(v)) for i, v in zip(ids, vals)]
               for ids, vals in zip(g.topk_ids, g.topk_logprobs)]
    return response_line(r.custom_id, r.url, r.request_id, top_logprobs=r.top_logprobs,
                         text=g.text, finish_reason=g.finish_reason,
                         prompt_tokens=len(r.prompt_ids), completion_tokens=len(g.output_ids),
                         model=model, logprob_tokens=toks, token_logprobs=lps, top_tokens=top,
                         executor=executor)


def _inference(r: ShardRequest, g: Generation) -> Inference:
    return Inference(r.request_id, np.asarray(r.prompt_ids, np.int32),
                     np.asarray(g.output_ids, np.int32), np.asarray(g.token_logprobs, np.float32),
                     np.asarray(g.topk_ids, np.int32), np.asarray(g.topk_logprobs, np.float32),
                     int(r.seed), r.temperature, r.top_p, r.top_k, r.max_tokens,
                     g.finish_reason)


def _commit_record(identity: Identity, shard: Shard, path: Path) -> SignedRecord:
    batch = read_batch(path)
    h = batch.header
    return sign_record(identity, ArtifactBatchCommitted(
        shard.job_id, shard.shard_id, identity.name, h.merkle_root, h.n_requests, h.n_tokens,
        h.model_hash, file_sha256(path)))


def run_shard(spool: Spool, shard: Shard, identity: Identity, engine: Engine,
              post: Callable[[SignedRecord], str], *, batch_size: int = 8,
              on_progress: Callable[[int], None] | None = None) -> ShardResult:
    """Run one shard to completion (or just commit it if its artifact is already whole)."""
    if shard.executor != identity.name:
        raise GonkaError(f"shard {shard.shard_id} is assigned to '{shard.executor}', "
                         f"not to this node ('{identity.name}')")
    if shard.model_hash != engine.model_hash:
        raise GonkaError(f"shard {shard.shard_id} asks for model {shard.model_hash[:12]}…, "
                         f"this node serves {engine.model_hash[:12]}…")
    art = spool.artifact_path(shard.shard_id)
    resumed = False
    try:
        read_batch(art).verify(identity.public_hex)
        resumed = spool.output_path(shard.shard_id).exists()
    except (GonkaError, FileNotFoundError):
        resumed = False
    if not resumed:
        gens: list[Generation] = []
        for i in range(0, len(shard.requests), batch_size):
            chunk = shard.requests[i:i + batch_size]
            gens.extend(engine.generate([_gen_request(r) for r in chunk]))
            atomic_write_text(spool.progress_path(shard.shard_id),
                              json.dumps({"done": len(gens), "total": len(shard.requests)}))
            if on_progress:
                on_progress(len(chunk))
        lines = [json.dumps(_output_line(r, g, engine, shard.model, identity.name))
                 for r, g in zip(shard.requests, gens)]
        atomic_write_bytes(spool.output_path(shard.shard_id),
                           "".join(x + "\n" for x in lines).encode())
        write_batch(art, identity, epoch=shard.epoch, job_id=shard.job_id,
                    shard_id=shard.shard_id, model_hash=engine.model_hash, engine=engine.name,
                    engine_version=engine.version, dtype=getattr(engine, "dtype", "float32"),
                    k=shard.k, inferences=[_inference(r, g) for r, g in zip(shard.requests,
                                                                             gens)])
    rec = _commit_record(identity, shard, art)
    post(rec)
    body = rec.typed_body()
    atomic_write_text(spool.done_path(shard.shard_id), json.dumps(
        {"record_id": rec.record_id, "merkle_root": body.merkle_root}))
    atomic_write_text(spool.progress_path(shard.shard_id),
                      json.dumps({"done": len(shard.requests), "total": len(shard.requests)}))
    return ShardResult(shard.shard_id, body.n_requests, body.n_tokens, body.merkle_root,
                       resumed)


def run_node(spool: Spool, identity: Identity, engine: Engine,
             post: Callable[[SignedRecord], str], *, batch_size: int = 8,
             log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> list[ShardResult]:
    """Run every pending shard in the spool once; return what was done."""
    results = []
    for path in spool.shards():
        shard = spool.load(path)
        if spool.is_done(shard.shard_id):
            log(f"[{identity.name}] {shard.shard_id}: already done, skipped")
            continue
        res = run_shard(spool, shard, identity, engine, post, batch_size=batch_size)
        log(f"[{identity.name}] {shard.shard_id}: {res.n_requests} requests, {res.n_tokens} "
            f"tokens, root {res.merkle_root[:12]}…" + (" (resumed)" if res.resumed else ""))
        results.append(res)
    return results
