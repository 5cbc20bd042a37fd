"""Test helper: real shards in real spools, made by the real transfer agent.

Builds what an ML node finds at its site after the TA has assigned a job: one spool per
executor with its shard(s), the executors' key files (mode 0600) and an empty validators'
inbox. No validators run; the TA's records are collected in a list. Used by the node
checkpoint tests and the Slurm tests, which both need shards long enough to interrupt.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gonka_hpc.artifacts import read_batch
from gonka_hpc.identity import Identity
from gonka_hpc.jobfile import read_job_file
from gonka_hpc.records import SignedRecord
from gonka_hpc.spool import Shard, Spool
from gonka_hpc.transfer_agent import TransferAgent, authorize_escrow

TA = "ta"
BLOCK = "5e" * 32


@dataclass
class Site:
    """Spools, keys and inbox under one root, and every shard the TA wrote."""

    root: Path
    ids: dict[str, Identity]
    shards: list[Shard] = field(default_factory=list)
    ta_records: list[SignedRecord] = field(default_factory=list)

    @property
    def inbox(self) -> Path:
        return self.root / "inbox"

    @property
    def spool_root(self) -> Path:
        return self.root / "spool"

    def spool(self, executor: str) -> Spool:
        return Spool(self.spool_root / executor)

    def key(self, name: str) -> Path:
        return self.root / "keys" / f"{name}.key"


def make_site(root: Path, engine: Any, *, executors: tuple[str, ...] = ("n0", "n1"),
              jobs: int = 1, requests: int = 8, max_tokens: int = 16) -> Site:
    """Spool `jobs` jobs of `requests` requests each over `executors` (the TA never executes)."""
    names = [TA, *executors, "client"]
    ids = {n: Identity.from_seed(n, bytes([i + 1]) * 32) for i, n in enumerate(names)}
    site = Site(Path(root), ids)
    for n in names:
        ids[n].save(site.key(n))
    site.inbox.mkdir(parents=True, exist_ok=True)
    weights = {n: 10 for n in [TA, *executors]}
    spools = {n: site.spool(n) for n in weights}
    ta = TransferAgent(ids[TA], epoch=1, model="gonka-tiny", model_hash=engine.model_hash, k=5,
                       price_per_token=1, tokenizer=engine.tokenizer,
                       max_model_len=engine.max_model_len, spools=spools,
                       post=lambda r: site.ta_records.append(r) or r.record_id)
    for j in range(jobs):
        path = site.root / f"job{j}.jsonl"
        path.write_text("".join(json.dumps({
            "custom_id": f"j{j}-r{i}", "method": "POST", "url": "/v1/completions",
            "body": {"model": "gonka-tiny", "prompt": f"the small cat number {i}",
                     "max_tokens": max_tokens, "temperature": 0.8, "seed": i}}) + "\n"
            for i in range(requests)))
        job = ta.admit(read_job_file(path, model="gonka-tiny", max_tokens_limit=256))
        job_id, escrow, sig = authorize_escrow(ids["client"], job, ta=TA, epoch=1,
                                               price_per_token=1)
        plan = ta.accept(job, client="client", job_id=job_id, escrow=escrow,
                         client_signature=sig, block_hash=BLOCK, weights=weights)
        site.shards.extend(plan.shards.values())
    return site


def check_exactly_once(site: Site) -> dict[str, int]:
    """Assert every shard is done: each request answered exactly once in the output file and
    in the signed, verifying artifact, and its commit record in the inbox. Returns the number
    of output lines per shard."""
    counts = {}
    for shard in site.shards:
        spool = site.spool(shard.executor)
        assert spool.is_done(shard.shard_id), f"{shard.shard_id} not done"
        wanted = [r.request_id for r in shard.requests]
        lines = [json.loads(x) for x in spool.output_path(shard.shard_id).read_text()
                 .splitlines()]
        answered = Counter(x["response"]["request_id"] for x in lines)
        dupes = {k: v for k, v in answered.items() if v > 1}
        assert not dupes, f"{shard.shard_id}: answered twice: {dupes}"
        assert sorted(answered) == sorted(wanted), f"{shard.shard_id}: lost or foreign answers"
        batch = read_batch(spool.artifact_path(shard.shard_id))
        batch.verify(site.ids[shard.executor].public_hex)
        assert [i.request_id for i in batch.inferences] == wanted
        done = json.loads(spool.done_path(shard.shard_id).read_text())
        assert (site.inbox / f"{done['record_id']}.json").exists(), "commit not posted"
        assert not spool.partial_dir(shard.shard_id).exists(), "checkpoint left behind"
        counts[shard.shard_id] = len(lines)
    return counts
