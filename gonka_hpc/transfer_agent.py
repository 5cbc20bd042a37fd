"""The transfer agent (TA): takes a client's job, escrows it, assigns it, and delivers it.

1. The client signs an escrow authorization for the job's maximum price (Σ max_tokens × price).
2. The TA records `job_accepted` and, per executor shard, `inference_assigned` on the ledger at
   once: the ledger finalizes them while inference runs.
3. Each request goes to an executor chosen by weight, at random from the last finalized block
   hash and the request id, never the TA's own participant. Its sampling seed is derived from
   the same block hash, the request id and the client's seed.
4. When the shards are done, the TA merges output lines into the client's output file, in input
   order, bad lines answered in place, and records `output_delivered`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .artifacts import read_batch
from .canonical import canonical_hash, sha256_hex
from .engines.base import output_text
from .errors import GonkaError
from .fileutil import atomic_write_bytes
from .identity import Identity
from .jobfile import CHAT, JobFile, LineError, Request, error_line, failed_line
from .randomness import choose_executor
from .records import (
    InferenceAssigned,
    JobAccepted,
    OutputDelivered,
    SignedRecord,
    escrow_authorization_bytes,
    sign_record,
)
from .sampling import derive_seed
from .spool import Shard, ShardRequest, Spool


@dataclass(frozen=True)
class JobPlan:
    """What the TA decided for one job."""

    job_id: str
    client: str
    job: JobFile
    escrow: int
    shards: dict[str, Shard]  # executor -> shard
    records: list[SignedRecord] = field(default_factory=list)

    def request_id(self, line: int) -> str:
        return f"{self.job_id}:{line}"


def job_id_for(client: str, job_sha256: str, epoch: int) -> str:
    return "job-" + canonical_hash({"client": client, "job": job_sha256, "epoch": epoch})[:16]


def escrow_for(job: JobFile, price_per_token: int) -> int:
    return sum(r.max_tokens for r in job.requests) * price_per_token


def authorize_escrow(client: Identity, job: JobFile, *, ta: str, epoch: int,
                     price_per_token: int) -> tuple[str, int, str]:
    """Client side: (job_id, escrow, signature) letting `ta` escrow the job's maximum price."""
    job_id = job_id_for(client.name, job.sha256, epoch)
    escrow = escrow_for(job, price_per_token)
    return job_id, escrow, client.sign(escrow_authorization_bytes(job_id, ta, job.sha256, escrow))


def encode_prompt(tokenizer: Any, req: Request) -> list[int]:
    """Token ids of the prompt; chat requests go through the model's chat template."""
    if req.url == CHAT:
        msgs = [m.model_dump() for m in req.body.messages]  # type: ignore[union-attr]
        ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, Mapping):
            ids = ids["input_ids"]
        return [int(i) for i in ids]
    return [int(i) for i in tokenizer.encode(req.body.prompt)]  # type: ignore[union-attr]


class TransferAgent:
    """One participant's TA. Posting goes through `post` (the ledger inbox in practice)."""

    def __init__(self, identity: Identity, *, epoch: int, model: str, model_hash: str, k: int,
                 price_per_token: int, tokenizer: Any, max_model_len: int,
                 spools: Mapping[str, Spool], post: Callable[[SignedRecord], str]) -> None:
        self.identity, self.epoch, self.model, self.model_hash = identity, epoch, model, \
            model_hash
        self.k, self.price, self.tokenizer, self.spools, self.post = k, price_per_token, \
            tokenizer, spools, post
        self.max_model_len = max_model_len
        self._prompt_ids: dict[tuple[str, int], list[int]] = {}

    def admit(self, job: JobFile) -> JobFile:
        """Tokenize every request; one that cannot fit the model's context becomes an error
        line (naming the field), so no executor is ever handed a request it must refuse."""
        entries: list[Request | LineError] = []
        for e in job.entries:
            if isinstance(e, Request):
                ids = encode_prompt(self.tokenizer, e)
                if len(ids) + e.max_tokens > self.max_model_len:
                    field = "body.messages" if e.url == CHAT else "body.prompt"
                    entries.append(LineError(
                        e.line, e.custom_id, field,
                        f"prompt of {len(ids)} tokens + max_tokens {e.max_tokens} exceeds the "
                        f"model's context of {self.max_model_len} tokens"))
                    continue
                self._prompt_ids[(job.sha256, e.line)] = ids
            entries.append(e)
        return JobFile(job.path, job.sha256, entries)

    def choose_executor(self, block_hash: str, request_id: str,
                        weights: Mapping[str, int]) -> str:
        if not any(w > 0 for n, w in weights.items() if n != self.identity.name):
            raise GonkaError("no executor available: jobs run on another participant than "
                             "the TA's own, and there is none")
        return choose_executor(block_hash, request_id, self.identity.name, weights)

    def accept(self, job: JobFile, *, client: str, job_id: str, escrow: int,
               client_signature: str, block_hash: str, weights: Mapping[str, int]) -> JobPlan:
        """Escrow, assign and spool a job; post its records at once. Returns the plan."""
        if escrow != escrow_for(job, self.price):
            raise GonkaError(f"escrow {escrow} does not cover the job's maximum price "
                             f"{escrow_for(job, self.price)}")
        records = [sign_record(self.identity, JobAccepted(
            job_id, client, self.identity.name, job.sha256, len(job.requests), escrow,
            client_signature))]
        self.post(records[0])
        by_exec: dict[str, list[ShardRequest]] = {}
        for req in job.requests:
            rid = f"{job_id}:{req.line}"
            executor = self.choose_executor(block_hash, rid, weights)
            b = req.body
            by_exec.setdefault(executor, []).append(ShardRequest(
                rid, req.line, req.custom_id, req.url,
                self._prompt_ids.get((job.sha256, req.line)) or encode_prompt(self.tokenizer, req),
                req.max_tokens, float(b.temperature), float(b.top_p), max(b.top_k, 0),
                str(derive_seed(block_hash, rid, b.seed)), list(req.stop), req.top_logprobs,
                req.min_tokens))
        shards: dict[str, Shard] = {}
        for executor in sorted(by_exec):
            shard = Shard(job_id, f"{job_id}-{executor}", self.epoch, executor,
                          self.identity.name, block_hash, self.model, self.model_hash, self.k,
                          by_exec[executor])
            self.spools[executor].put(shard)
            rec = sign_record(self.identity, InferenceAssigned(
                job_id, shard.shard_id, executor, tuple(r.request_id for r in shard.requests),
                sum(r.max_tokens for r in shard.requests), shard.sha256, block_hash))
            self.post(rec)
            records.append(rec)
            shards[executor] = shard
        return JobPlan(job_id, client, job, escrow, shards, records)

    def deliver(self, plan: JobPlan, output_path: Path) -> SignedRecord:
        """Merge the executors' output lines into the client's file, in input order.

        Each line is checked against the executor's committed artifact: the text must be the
        decoding of the committed tokens and the usage their count. A line that is missing,
        unparsable or not backed by the artifact is answered as a failed request (500), so
        the client never receives output nobody can verify.
        """
        by_line: dict[int, str] = {}
        n_errors = 0
        for executor, shard in plan.shards.items():
            spool = self.spools[executor]
            if not spool.is_done(shard.shard_id):
                raise GonkaError(f"shard {shard.shard_id} on {executor} is not complete")
            committed = {i.request_id: i for i in read_batch(
                spool.artifact_path(shard.shard_id)).inferences}
            sent: dict[str, dict[str, Any]] = {}
            for text in spool.output_path(shard.shard_id).read_text().splitlines():
                try:
                    line = json.loads(text)
                    sent[line["response"]["request_id"]] = line
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # an unparsable line backs no request; it is answered below
            for req in shard.requests:
                line = sent.get(req.request_id)
                problem = self._unbacked(line, committed.get(req.request_id), req.stop,
                                         req.min_tokens)
                if problem:
                    n_errors += 1
                    line = failed_line(req.custom_id, req.request_id,
                                       f"executor {executor}: {problem}")
                by_line[req.line] = json.dumps(line)
        for err in plan.job.errors:
            by_line[err.line] = json.dumps(error_line(err, str(plan.job.path),
                                                      plan.request_id(err.line)))
            n_errors += 1
        missing = [e.line for e in plan.job.entries if e.line not in by_line]
        if missing:
            raise GonkaError(f"output is missing lines {missing[:10]}")
        data = "".join(by_line[n] + "\n" for n in sorted(by_line)).encode()
        atomic_write_bytes(output_path, data)
        rec = sign_record(self.identity, OutputDelivered(plan.job_id, sha256_hex(data),
                                                         len(by_line), n_errors))
        self.post(rec)
        return rec

    def _unbacked(self, line: dict[str, Any] | None, inf: Any, stop: list[str],
                  min_tokens: int = 0) -> str | None:
        """Why an output line is not what the artifact commits to (None when it is)."""
        if line is None or inf is None:
            return "no output line or no committed inference for this request"
        try:
            body = line["response"]["body"]
            choice = body["choices"][0]
            text = choice["text"] if "text" in choice else choice["message"]["content"]
            n = body["usage"]["completion_tokens"]
        except (KeyError, TypeError, IndexError):
            return "malformed output line"
        if n != int(inf.output_ids.size):
            return f"usage says {n} tokens, the artifact commits {inf.output_ids.size}"
        if text != output_text(self.tokenizer, [int(t) for t in inf.output_ids], stop,
                               min_tokens):
            return "text is not the decoding of the committed tokens"
        return None
