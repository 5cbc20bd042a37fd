"""The ML-node worker: runs the shards waiting in an executor's spool.

For each shard not yet done it generates every request with the engine (seeded verifiable
sampling), writes the output lines and one signed HDF5 artifact batch, posts the batch's
`artifact_batch_committed` record, and writes the `.done` marker last.

Preemption-safe (Slurm requeues idle-time jobs): after each engine batch, that batch's
generations are checkpointed atomically under `out/<shard>.partial/`, and a restarted worker
resumes from them, generating only what no checkpoint holds. A `StopSignal` (SIGUSR2 or
SIGTERM) is honoured between batches: the batch in flight finishes, is checkpointed, and the
worker raises `Preempted` (the CLI exits with `EXIT_PREEMPTED`, 75). A batch is a group of at
least `batch_size` finished requests (`engines.base.generate_groups`): consecutive requests on the
reference engine; on vLLM, whichever finish first while its continuous batch stays full, the
unfinished rest being dropped on preemption and generated again after the restart. Outputs and the artifact
are written only once every request has a generation, keyed by request id in shard order, so
each request is answered exactly once however often the shard was interrupted. Done shards are
skipped, and a shard whose artifact is already whole is committed from that file instead of
being generated again.
"""

from __future__ import annotations

import json
import shutil
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .artifacts import Inference, file_sha256, read_batch, write_batch
from .engines.base import Engine, Generation, GenerationRequest, generate_groups
from .errors import GonkaError
from .fileutil import atomic_write_bytes, atomic_write_text
from .identity import Identity
from .jobfile import response_line
from .records import ArtifactBatchCommitted, SignedRecord, sign_record
from .sampling import SamplingParams
from .spool import Shard, ShardRequest, Spool

EXIT_PREEMPTED = 75
"""Exit code of `gonka-hpc node` stopped by SIGUSR2/SIGTERM after checkpointing (EX_TEMPFAIL)."""

CHECKPOINT_VERSION = 1


@dataclass(frozen=True)
class ShardResult:
    shard_id: str
    n_requests: int
    n_tokens: int
    merkle_root: str
    resumed: bool  # True when the artifact already existed and was only committed
    restored: int = 0  # requests taken from a checkpoint instead of being generated


class Preempted(GonkaError):
    """The worker was asked to stop; every finished batch is checkpointed."""

    exit_code = EXIT_PREEMPTED


class StopSignal:
    """Records a stop request (SIGUSR2 or SIGTERM); the worker checks it between batches."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def install(self, signums: tuple[int, ...] = (signal.SIGUSR2, signal.SIGTERM)) -> None:
        for s in signums:
            signal.signal(s, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "none"


# --- checkpoints ------------------------------------------------------------------------------
# One JSON file per finished engine batch, written atomically; float32 values survive the trip
# through JSON exactly (float32 -> float64 repr -> float32).


def _gen_to_json(g: Generation) -> dict:
    return {"request_id": g.request_id, "output_ids": [int(x) for x in g.output_ids],
            "token_logprobs": [float(x) for x in np.asarray(g.token_logprobs)],
            "topk_ids": np.asarray(g.topk_ids).astype(int).tolist(),
            "topk_logprobs": np.asarray(g.topk_logprobs, np.float32).astype(float).tolist(),
            "finish_reason": g.finish_reason, "text": g.text}


def _gen_from_json(d: dict, k: int) -> Generation:
    n = len(d["output_ids"])
    return Generation(d["request_id"], tuple(int(x) for x in d["output_ids"]),
                      np.asarray(d["token_logprobs"], np.float32),
                      np.asarray(d["topk_ids"], np.int32).reshape(n, k),
                      np.asarray(d["topk_logprobs"], np.float32).reshape(n, k),
                      d["finish_reason"], d["text"])


def write_checkpoint(spool: Spool, shard: Shard, first: int, gens: list[Generation],
                     shard_sha256: str | None = None) -> Path:
    """Checkpoint one finished engine batch (requests first.. of the shard), atomically.

    `shard_sha256` saves re-encoding the whole shard for every batch when the caller has it."""
    path = spool.partial_dir(shard.shard_id) / f"batch-{first:06d}.json"
    atomic_write_text(path, json.dumps({
        "v": CHECKPOINT_VERSION, "shard_sha256": shard_sha256 or shard.sha256,
        "executor": shard.executor,
        "model_hash": shard.model_hash, "generations": [_gen_to_json(g) for g in gens]}))
    return path


def load_checkpoint(spool: Spool, shard: Shard) -> dict[str, Generation]:
    """Every generation checkpointed for this shard, by request id."""
    wanted = {r.request_id for r in shard.requests}
    found: dict[str, Generation] = {}
    pdir = spool.partial_dir(shard.shard_id)
    shard_sha = shard.sha256 if pdir.is_dir() else ""
    for path in sorted(pdir.glob("batch-*.json")) if pdir.is_dir() else []:
        try:
            doc = json.loads(path.read_text())
            if doc.get("v") != CHECKPOINT_VERSION:
                raise ValueError(f"unsupported checkpoint version {doc.get('v')!r}")
            gens = [_gen_from_json(d, shard.k) for d in doc["generations"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise GonkaError(f"{path}: unreadable checkpoint ({exc}); delete it to regenerate "
                             "its requests") from None
        if doc["shard_sha256"] != shard_sha or doc["model_hash"] != shard.model_hash:
            raise GonkaError(f"{path}: checkpoint of another shard version or model; delete "
                             f"{pdir} to regenerate the shard")
        for g in gens:
            if g.request_id not in wanted:
                raise GonkaError(f"{path}: request {g.request_id} is not in the shard")
            found.setdefault(g.request_id, g)
    return found


def _gen_request(r: ShardRequest) -> GenerationRequest:
    return GenerationRequest(r.request_id, tuple(r.prompt_ids), r.max_tokens,
                             SamplingParams(r.temperature, r.top_p, r.top_k), int(r.seed),
                             tuple(r.stop), r.min_tokens)


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
                     g.finish_reason, r.min_tokens)


def _commit_record(identity: Identity, shard: Shard, path: Path) -> SignedRecord:
    batch = read_batch(path)
    h = batch.header
    return sign_record(identity, ArtifactBatchCommitted(
        shard.job_id, shard.shard_id, identity.name, h.merkle_root, h.n_requests, h.n_tokens,
        h.model_hash, file_sha256(path)))


def run_shard(spool: Spool, shard: Shard, identity: Identity, engine: Engine,
              post: Callable[[SignedRecord], str], *, batch_size: int = 8,
              on_progress: Callable[[int], None] | None = None,
              stop: StopSignal | None = None) -> ShardResult:
    """Run one shard to completion, resuming from its checkpoint (or just commit it if its
    artifact is already whole). Raises `Preempted` between batches once `stop` is requested."""
    if shard.executor != identity.name:
        raise GonkaError(f"shard {shard.shard_id} is assigned to '{shard.executor}', "
                         f"not to this node ('{identity.name}')")
    if shard.k != engine.k:
        raise GonkaError(f"shard {shard.shard_id} asks for top-{shard.k} logprobs, this node's "
                         f"engine returns top-{engine.k}")
    if shard.model_hash != engine.model_hash:
        raise GonkaError(f"shard {shard.shard_id} asks for model {shard.model_hash[:12]}…, "
                         f"this node serves {engine.model_hash[:12]}…")
    art = spool.artifact_path(shard.shard_id)
    total = len(shard.requests)
    resumed = False
    try:
        read_batch(art).verify(identity.public_hex)
        resumed = spool.output_path(shard.shard_id).exists()
    except (GonkaError, FileNotFoundError):
        resumed = False
    restored = 0
    if not resumed:
        done = load_checkpoint(spool, shard)
        restored = len(done)
        todo = [(i, r) for i, r in enumerate(shard.requests) if r.request_id not in done]
        shard_sha = ""  # computed once, after the first group: an engine in another
        # process (vLLM) keeps decoding meanwhile
        # Groups of at least batch_size finished requests, each checkpointed; an engine with
        # continuous batching keeps its batch full across groups (base.generate_groups).
        stream = generate_groups(engine, [_gen_request(r) for _, r in todo], batch_size)
        try:
            while True:
                if stop is not None and stop.requested:
                    raise Preempted(f"shard {shard.shard_id}: stopped by {stop.name} after "
                                    f"{len(done)}/{total} requests; checkpoint in "
                                    f"{spool.partial_dir(shard.shard_id)}")
                group = next(stream, None)
                if group is None:
                    break
                gens = [g for _, g in group]
                shard_sha = shard_sha or shard.sha256
                write_checkpoint(spool, shard, min(todo[j][0] for j, _ in group), gens,
                                 shard_sha)
                done.update((g.request_id, g) for g in gens)
                atomic_write_text(spool.progress_path(shard.shard_id),
                                  json.dumps({"done": len(done), "total": total}))
                if on_progress:
                    on_progress(len(group))
        finally:
            stream.close()  # preempted: the engine drops what it has not finished
        missing = [r.request_id for r in shard.requests if r.request_id not in done]
        if missing:  # an engine that drops requests is a bug, never a short artifact
            raise GonkaError(f"shard {shard.shard_id}: no generation for {missing[:3]}")
        ordered = [done[r.request_id] for r in shard.requests]
        lines = [json.dumps(_output_line(r, g, engine, shard.model, identity.name))
                 for r, g in zip(shard.requests, ordered)]
        atomic_write_bytes(spool.output_path(shard.shard_id),
                           "".join(x + "\n" for x in lines).encode())
        write_batch(art, identity, epoch=shard.epoch, job_id=shard.job_id,
                    shard_id=shard.shard_id, model_hash=engine.model_hash, engine=engine.name,
                    engine_version=engine.version, dtype=getattr(engine, "dtype", "float32"),
                    k=shard.k, inferences=[_inference(r, g) for r, g in zip(shard.requests,
                                                                             ordered)])
    rec = _commit_record(identity, shard, art)
    post(rec)
    body = rec.typed_body()
    atomic_write_text(spool.done_path(shard.shard_id), json.dumps(
        {"record_id": rec.record_id, "merkle_root": body.merkle_root}))
    atomic_write_text(spool.progress_path(shard.shard_id),
                      json.dumps({"done": total, "total": total}))
    shutil.rmtree(spool.partial_dir(shard.shard_id), ignore_errors=True)
    return ShardResult(shard.shard_id, body.n_requests, body.n_tokens, body.merkle_root,
                       resumed, restored)


def pending_shards(spool: Spool) -> list[Path]:
    """Shard files in the spool's inbox that have no `.done` marker yet."""
    return [p for p in spool.shards() if not spool.is_done(p.stem)]


def run_node(spool: Spool, identity: Identity, engine: Engine,
             post: Callable[[SignedRecord], str], *, batch_size: int = 8,
             log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
             stop: StopSignal | None = None) -> list[ShardResult]:
    """Run every pending shard in the spool once; return what was done.

    Raises `Preempted` when `stop` is requested (finished batches stay checkpointed)."""
    results = []
    for path in spool.shards():
        shard = spool.load(path)
        if spool.is_done(shard.shard_id):
            log(f"[{identity.name}] {shard.shard_id}: already done, skipped")
            continue
        res = run_shard(spool, shard, identity, engine, post, batch_size=batch_size, stop=stop)
        log(f"[{identity.name}] {shard.shard_id}: {res.n_requests} requests, {res.n_tokens} "
            f"tokens, root {res.merkle_root[:12]}…" + (" (resumed)" if res.resumed else "")
            + (f" ({res.restored} from checkpoint)" if res.restored else ""))
        results.append(res)
    return results
