"""Verification artifacts: one signed HDF5 batch per executor shard.

For every inference the batch holds the prompt and output token ids, and per output token the
sampled token's raw logprob and the top-k ids and logprobs, plus the sampling parameters and the
derived seed. The layout is ragged: `*_offsets` (R+1) index flat token arrays, so a batch of
any size is a handful of chunked, gzip+shuffle datasets readable with plain h5py or h5dump.

File attributes bind the batch: format version, executor, epoch, job and shard, model content
hash, engine and version, k, the Merkle root over per-request leaves and the executor's
ed25519 signature over the canonical header. The file is written to a temp path, fsynced and
renamed, and signed only once complete. See docs/formats.md.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .canonical import canonical_bytes
from .errors import GonkaError, SignatureError
from .fileutil import atomic_path
from .identity import Identity, verify_signature
from .merkle import leaf_hash, merkle_proof, merkle_root

FORMAT = "gonka-artifact-batch"
FORMAT_VERSION = 2
"""2 added `min_tokens` (a dataset, and in every Merkle leaf's header). Version 1 batches still
read, verify and re-hash as written (min_tokens 0); new batches are written as version 2."""
READ_VERSIONS = (1, 2)
_COMPRESS: dict[str, Any] = {"compression": "gzip", "compression_opts": 4, "shuffle": True}


@dataclass(frozen=True)
class Inference:
    """One request's artifact: what was asked, what was sampled, and the logprobs seen."""

    request_id: str
    prompt_ids: np.ndarray  # int32 (P,)
    output_ids: np.ndarray  # int32 (n,)
    token_logprobs: np.ndarray  # float32 (n,) raw logprob of each sampled token
    topk_ids: np.ndarray  # int32 (n, k)
    topk_logprobs: np.ndarray  # float32 (n, k)
    seed: int  # derived 64-bit sampling seed
    temperature: float
    top_p: float
    top_k: int  # 0 = off
    max_tokens: int
    finish_reason: str
    min_tokens: int = 0  # vLLM's min_tokens: no EOS or stop string before this many tokens

    def leaf_bytes(self, version: int = FORMAT_VERSION) -> bytes:
        """The bytes committed by the Merkle leaf: a canonical header and the raw arrays
        (`version` 1: the header without min_tokens, which must then be 0)."""
        fields = {
            "v": version, "request_id": self.request_id, "seed": str(self.seed),
            "temperature": float(self.temperature), "top_p": float(self.top_p),
            "top_k": int(self.top_k), "max_tokens": int(self.max_tokens),
            "finish_reason": self.finish_reason, "n_prompt": int(self.prompt_ids.size),
            "n_output": int(self.output_ids.size), "k": int(self.topk_ids.shape[1])
            if self.topk_ids.ndim == 2 else 0}
        if version >= 2:
            fields["min_tokens"] = int(self.min_tokens)
        elif self.min_tokens:
            raise ValueError(f"{self.request_id}: a version-1 leaf cannot carry min_tokens")
        head = canonical_bytes(fields)
        return b"".join([
            head, np.ascontiguousarray(self.prompt_ids, "<i4").tobytes(),
            np.ascontiguousarray(self.output_ids, "<i4").tobytes(),
            np.ascontiguousarray(self.token_logprobs, "<f4").tobytes(),
            np.ascontiguousarray(self.topk_ids, "<i4").tobytes(),
            np.ascontiguousarray(self.topk_logprobs, "<f4").tobytes()])

    def leaf(self, version: int = FORMAT_VERSION) -> bytes:
        return leaf_hash(self.leaf_bytes(version))


@dataclass(frozen=True)
class BatchHeader:
    """What the executor signs; stored as HDF5 attributes."""

    executor: str
    epoch: int
    job_id: str
    shard_id: str
    model_hash: str
    engine: str
    engine_version: str
    dtype: str
    k: int
    n_requests: int
    n_tokens: int
    merkle_root: str

    def signing_bytes(self, version: int = FORMAT_VERSION) -> bytes:
        return canonical_bytes({"format": FORMAT, "v": version, **self.__dict__})


@dataclass(frozen=True)
class ArtifactBatch:
    header: BatchHeader
    signature: str
    inferences: list[Inference]
    format_version: int = FORMAT_VERSION
    """The file's version: leaves and the signed header are hashed as that version wrote them."""

    def verify(self, executor_pubkey: str) -> None:
        """Raise unless the leaves hash to the signed root and the executor signed it."""
        root = merkle_root([inf.leaf(self.format_version) for inf in self.inferences])
        if root != self.header.merkle_root:
            raise SignatureError(f"artifact batch {self.header.shard_id}: Merkle root "
                                 f"{root[:16]}… does not match the signed "
                                 f"{self.header.merkle_root[:16]}…")
        n_tokens = sum(int(inf.output_ids.size) for inf in self.inferences)
        if n_tokens != self.header.n_tokens:
            raise SignatureError(f"artifact batch {self.header.shard_id}: {n_tokens} output "
                                 f"tokens, header says {self.header.n_tokens}")
        if len(self.inferences) != self.header.n_requests:
            raise SignatureError(f"artifact batch {self.header.shard_id}: "
                                 f"{len(self.inferences)} inferences, header says "
                                 f"{self.header.n_requests}")
        try:
            verify_signature(executor_pubkey, self.header.signing_bytes(self.format_version),
                             self.signature)
        except SignatureError:
            raise SignatureError(f"artifact batch {self.header.shard_id}: executor signature "
                                 f"does not verify for '{self.header.executor}'") from None

    def proof(self, index: int) -> list[tuple[str, str]]:
        return merkle_proof([inf.leaf(self.format_version) for inf in self.inferences], index)


def _ragged(arrays: Sequence[np.ndarray], dtype: str) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([a.shape[0] for a in arrays])
    flat = np.concatenate(arrays).astype(dtype) if arrays else np.zeros(0, dtype)
    return offsets, flat


def write_batch(path: Path, identity: Identity, *, epoch: int, job_id: str, shard_id: str,
                model_hash: str, engine: str, engine_version: str, dtype: str, k: int,
                inferences: Sequence[Inference]) -> ArtifactBatch:
    """Hash, sign and write a complete batch atomically; return it."""
    for inf in inferences:
        n = inf.output_ids.size
        if inf.token_logprobs.shape != (n,) or inf.topk_ids.shape != (n, k) \
                or inf.topk_logprobs.shape != (n, k):
            raise ValueError(f"{inf.request_id}: arrays do not match {n} tokens and k={k}")
    root = merkle_root([inf.leaf() for inf in inferences])
    n_tokens = int(sum(inf.output_ids.size for inf in inferences))
    header = BatchHeader(identity.name, epoch, job_id, shard_id, model_hash, engine,
                         engine_version, dtype, k, len(inferences), n_tokens, root)
    signature = identity.sign(header.signing_bytes())
    str_t = h5py.string_dtype("utf-8")
    with atomic_path(Path(path)) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["format"] = FORMAT
        f.attrs["format_version"] = FORMAT_VERSION
        for key, value in header.__dict__.items():
            f.attrs[key] = value
        f.attrs["signature"] = signature
        f.create_dataset("request_ids", data=[i.request_id for i in inferences],
                         dtype=str_t)
        f.create_dataset("finish_reason", data=[i.finish_reason for i in inferences],
                         dtype=str_t)
        f.create_dataset("seed", data=np.array([i.seed for i in inferences], np.uint64))
        f.create_dataset("temperature", data=np.array(
            [i.temperature for i in inferences], np.float64))
        f.create_dataset("top_p", data=np.array([i.top_p for i in inferences], np.float64))
        f.create_dataset("top_k", data=np.array([i.top_k for i in inferences], np.int32))
        f.create_dataset("max_tokens", data=np.array(
            [i.max_tokens for i in inferences], np.int32))
        f.create_dataset("min_tokens", data=np.array(
            [i.min_tokens for i in inferences], np.int32))
        for name, arrs, dt in (("prompt", [i.prompt_ids for i in inferences], "<i4"),
                               ("output", [i.output_ids for i in inferences], "<i4")):
            offsets, flat = _ragged(arrs, dt)
            f.create_dataset(f"{name}_offsets", data=offsets)
            f.create_dataset(f"{name}_ids", data=flat, chunks=True if flat.size else None,
                             **(_COMPRESS if flat.size else {}))
        n = n_tokens
        lp = np.concatenate([i.token_logprobs for i in inferences]).astype("<f4") \
                if n else np.zeros(0, "<f4")
        tk_ids = np.concatenate([i.topk_ids.reshape(-1, k) for i in inferences]) \
                .astype("<i4") if n else np.zeros((0, k), "<i4")
        tk_lp = np.concatenate([i.topk_logprobs.reshape(-1, k) for i in inferences]) \
                .astype("<f4") if n else np.zeros((0, k), "<f4")
        opts = _COMPRESS if n else {}
        f.create_dataset("token_logprobs", data=lp, chunks=True if n else None, **opts)
        f.create_dataset("topk_ids", data=tk_ids, chunks=True if n else None, **opts)
        f.create_dataset("topk_logprobs", data=tk_lp, chunks=True if n else None, **opts)
    return ArtifactBatch(header, signature, list(inferences))


def read_batch(path: Path) -> ArtifactBatch:
    """Read a batch back. Raises GonkaError naming the file if it is not a whole batch."""
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != FORMAT:
                raise GonkaError(f"{path}: not a gonka artifact batch")
            version = int(f.attrs["format_version"])
            if version not in READ_VERSIONS:
                raise GonkaError(f"{path}: artifact format version "
                                 f"{f.attrs['format_version']} is not supported")
            fields = BatchHeader.__dataclass_fields__
            hdr = {}
            for key, fld in fields.items():
                v = f.attrs[key]
                hdr[key] = int(v) if fld.type == "int" else str(v)
            header = BatchHeader(**hdr)
            signature = str(f.attrs["signature"])
            rids = [s.decode() if isinstance(s, bytes) else s for s in f["request_ids"][()]]
            fin = [s.decode() if isinstance(s, bytes) else s for s in f["finish_reason"][()]]
            po, pids = f["prompt_offsets"][()], f["prompt_ids"][()]
            oo, oids = f["output_offsets"][()], f["output_ids"][()]
            lp, tki, tkl = f["token_logprobs"][()], f["topk_ids"][()], f["topk_logprobs"][()]
            seed, temp, top_p = f["seed"][()], f["temperature"][()], f["top_p"][()]
            top_k, max_tokens = f["top_k"][()], f["max_tokens"][()]
            min_tokens = f["min_tokens"][()] if version >= 2 else np.zeros(len(rids), np.int32)
    except (OSError, KeyError) as exc:
        raise GonkaError(f"{path}: unreadable or incomplete artifact batch ({exc})") from None
    infs = []
    for r, rid in enumerate(rids):
        a, b = int(oo[r]), int(oo[r + 1])
        infs.append(Inference(
            rid, pids[int(po[r]):int(po[r + 1])], oids[a:b], lp[a:b], tki[a:b], tkl[a:b],
            int(seed[r]), float(temp[r]), float(top_p[r]), int(top_k[r]), int(max_tokens[r]),
            fin[r], int(min_tokens[r])))
    return ArtifactBatch(header, signature, infs, version)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
