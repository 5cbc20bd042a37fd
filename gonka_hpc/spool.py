"""The spool: how shards reach an executor's site and how results come back.

Layout under one executor's spool dir:

    inbox/<shard_id>.json      the shard, written by the transfer agent (atomic)
    out/<shard_id>.jsonl       output lines, written by the ML node (atomic)
    out/<shard_id>.h5          the signed artifact batch (atomic)
    out/<shard_id>.done        written last: the shard is complete and committed
    out/<shard_id>.progress    requests done so far, for progress display
    out/<shard_id>.partial/    the ML node's checkpoint while the shard runs: one file per
                               finished engine batch (atomic); removed once the shard is done

A shard is complete when its `.done` marker exists; a restarted node skips it. This module is
the local-directory transport; SFTP sites mirror the same layout.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .canonical import canonical_bytes, sha256_hex
from .errors import ValidationError
from .fileutil import atomic_write_bytes

SHARD_VERSION = 2
"""2 added `min_tokens` per request. Version 1 shards still read (min_tokens 0) and keep their
bytes, hence their sha256 (`Shard.version`)."""


@dataclass(frozen=True)
class ShardRequest:
    """One request as the executor receives it: tokens, parameters and the derived seed."""

    request_id: str
    line: int
    custom_id: str
    url: str
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: str  # 64-bit unsigned, as a decimal string (JSON numbers lose precision)
    stop: list[str]
    top_logprobs: int | None
    min_tokens: int = 0
    """No EOS or stop string ends the output before this many tokens (vLLM's min_tokens)."""


@dataclass(frozen=True)
class Shard:
    job_id: str
    shard_id: str
    epoch: int
    executor: str
    ta: str
    block_hash: str
    model: str
    model_hash: str
    k: int
    requests: list[ShardRequest]
    version: int = SHARD_VERSION
    """The encoding version: a shard read from a version-1 file re-encodes to the same bytes."""

    def encode(self) -> bytes:
        d = asdict(self)
        d["v"] = d.pop("version")
        if d["v"] == 1:
            if any(r["min_tokens"] for r in d["requests"]):
                raise ValueError("a version-1 shard cannot carry min_tokens")
            for r in d["requests"]:
                del r["min_tokens"]
        return canonical_bytes(d)

    @property
    def sha256(self) -> str:
        return sha256_hex(self.encode())

    @classmethod
    def decode(cls, raw: bytes, source: str = "<shard>") -> Shard:
        try:
            d: dict[str, Any] = json.loads(raw)
            version = d.pop("v")
            if version not in (1, SHARD_VERSION):
                raise ValidationError("unsupported shard version", file=source, field="v")
            raw_reqs = d.pop("requests")
            if version == 1 and any("min_tokens" in r for r in raw_reqs):
                raise ValidationError("min_tokens in a version-1 shard", file=source,
                                      field="requests.min_tokens")
            if version > 1 and any("min_tokens" not in r for r in raw_reqs):
                raise KeyError("min_tokens")
            reqs = [ShardRequest(**r) for r in raw_reqs]
            return cls(requests=reqs, version=version, **d)
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValidationError(f"not a valid shard file: {exc}", file=source) from None


@dataclass(frozen=True)
class Spool:
    """One executor's spool directory."""

    root: Path

    @property
    def inbox(self) -> Path:
        return self.root / "inbox"

    @property
    def out(self) -> Path:
        return self.root / "out"

    def put(self, shard: Shard) -> Path:
        path = self.inbox / f"{shard.shard_id}.json"
        atomic_write_bytes(path, shard.encode())
        return path

    def shards(self) -> list[Path]:
        return sorted(self.inbox.glob("*.json")) if self.inbox.is_dir() else []

    def load(self, path: Path) -> Shard:
        return Shard.decode(Path(path).read_bytes(), str(path))

    def output_path(self, shard_id: str) -> Path:
        return self.out / f"{shard_id}.jsonl"

    def artifact_path(self, shard_id: str) -> Path:
        return self.out / f"{shard_id}.h5"

    def done_path(self, shard_id: str) -> Path:
        return self.out / f"{shard_id}.done"

    def partial_dir(self, shard_id: str) -> Path:
        return self.out / f"{shard_id}.partial"

    def progress_path(self, shard_id: str) -> Path:
        return self.out / f"{shard_id}.progress"

    def is_done(self, shard_id: str) -> bool:
        return self.done_path(shard_id).exists()

    def progress(self, shard_id: str) -> int:
        """Requests of the shard answered so far (all of them once done)."""
        try:
            return int(json.loads(self.progress_path(shard_id).read_text())["done"])
        except (FileNotFoundError, ValueError, KeyError):
            return 0
