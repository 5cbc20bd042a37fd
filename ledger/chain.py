"""One validator's append-only chain on disk, and the readers the CLI uses.

A chain dir holds `genesis.json` (a copy of the genesis it started from) and `chain.log`: one
canonical JSON line per block, `{"block":..., "hash":..., "certificate":[...]}`, appended with
flush + fsync before the validator moves on. A crash can only leave a torn last line (no
newline, or bytes that do not parse): `Chain.open` truncates it back to the last whole block.
A bad line anywhere else is corruption, and is reported, never repaired.

Readers (`read_chain`, `head`, `find_records`) never modify the dir and ignore a torn tail,
so they are safe to run while a validator appends. This module does not check signatures or
state: `ledger.audit` does.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gonka_hpc.canonical import canonical_bytes, canonical_hash, sha256_hex
from gonka_hpc.errors import GonkaError
from gonka_hpc.fileutil import atomic_write_bytes, fsync_dir

from .block import Block, InvalidBlock, genesis_hash
from .votes import dumps_canonical

CHAIN_FILE = "chain.log"
GENESIS_FILE = "genesis.json"


class BadLine(ValueError):
    """A chain.log line that is not a stored block (torn by a crash, or corrupted)."""


class ChainError(GonkaError):
    """A chain dir that cannot be opened or read: missing, corrupted, or another genesis."""


@dataclass(frozen=True)
class StoredBlock:
    """One line of chain.log: the block, its hash as stored, and its commit certificate."""

    block: Block
    hash: str
    certificate: tuple[dict[str, Any], ...]

    @property
    def height(self) -> int:
        return self.block.height

    def encode_line(self) -> bytes:
        """The canonical bytes of {block, certificate, hash}, built around the block's own
        canonical bytes (encoded once) instead of encoding every record again."""
        return (b'{"block":' + self.block.encode() + b',"certificate":'
                + canonical_bytes(list(self.certificate)) + b',"hash":'
                + canonical_bytes(self.hash) + b"}\n")

    @classmethod
    def decode_line(cls, line: bytes) -> StoredBlock:
        """Parse one line (without its newline); raise BadLine if it is not a stored block.

        The line must be exactly the canonical encoding of what it decodes to (what
        `encode_line` writes): a CR, a space, `1.0` for `1`, `false` for `0` or a duplicate
        key decodes to the same block but is not the line a validator wrote."""
        try:
            data = json.loads(line, parse_constant=_no_constant)
            if not isinstance(data, dict) or set(data) != {"block", "hash", "certificate"}:
                raise BadLine("not a {block, hash, certificate} object")
            block = Block.from_dict(data["block"])
            cert = data["certificate"]
            if not isinstance(cert, list) or not all(isinstance(c, dict) for c in cert):
                raise BadLine("certificate is not a list of votes")
            if not isinstance(data["hash"], str):
                raise BadLine("hash is not a string")
            again = {"block": block.to_dict(), "certificate": cert, "hash": data["hash"]}
            if dumps_canonical(again) != line:
                raise BadLine("not in canonical form (sorted keys, no spaces, integers as "
                              "written, no duplicate keys, no CR)")
        except (ValueError, InvalidBlock, RecursionError, OverflowError) as exc:
            # (JSON and UTF-8 errors are ValueErrors; int(inf) overflows)
            if isinstance(exc, BadLine):
                raise
            raise BadLine(f"{type(exc).__name__}: {exc}") from None
        return cls(block, data["hash"], tuple(cert))


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _split(raw: bytes) -> tuple[list[tuple[int, bytes]], int]:
    """(offset, line) for every newline-terminated line, and the offset where they end."""
    lines: list[tuple[int, bytes]] = []
    pos = 0
    while True:
        nl = raw.find(b"\n", pos)
        if nl < 0:
            return lines, pos
        lines.append((pos, raw[pos:nl]))
        pos = nl + 1


def _parse(path: Path, raw: bytes, *, lenient_tail: bool) -> tuple[list[StoredBlock], int]:
    """The whole blocks of `raw` and the byte length they take.

    Bytes after the last newline (an append in progress, or torn by a crash) are never a
    block. With `lenient_tail`, a newline-terminated last line that does not parse is also
    treated as torn (recovery on open); otherwise it is corruption (readers, audits).
    """
    lines, end = _split(raw)
    blocks: list[StoredBlock] = []
    for i, (offset, line) in enumerate(lines):
        try:
            blocks.append(StoredBlock.decode_line(line))
        except BadLine as exc:
            if lenient_tail and i == len(lines) - 1 and end == len(raw):
                return blocks, offset  # a torn last line that happens to end in "\n"
            raise ChainError(f"{path}: line {i + 1} (byte {offset}) is corrupted: {exc}") \
                from None
    return blocks, end


def load_genesis(chain_dir: Path) -> dict[str, Any]:
    """The genesis.json of a chain dir (ChainError, never an OSError, if it cannot be read)."""
    return load_genesis_file(Path(chain_dir) / GENESIS_FILE, in_chain_dir=True)


def load_genesis_file(path: Path, *, in_chain_dir: bool = False) -> dict[str, Any]:
    """A genesis document from `path`; ChainError naming the path if it is not one."""
    path = Path(path)
    raw = _read_bytes(path, in_chain_dir=in_chain_dir)
    try:
        data = json.loads(raw, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:  # JSON and UTF-8 errors are ValueErrors
        raise ChainError(f"{path}: not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ChainError(f"{path}: not a genesis document (not a JSON object)")
    return data


def _read_bytes(path: Path, *, in_chain_dir: bool = True) -> bytes:
    """The bytes of a file (of a chain dir); ChainError saying why it cannot be read."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        where = path.parent
        if not in_chain_dir:
            raise ChainError(f"{path}: not found") from None
        if not where.exists():
            raise ChainError(f"{path}: not found ({where} does not exist)") from None
        raise ChainError(f"{path}: not found (is {where} a validator chain dir?)") from None
    except NotADirectoryError:
        raise ChainError(f"{path}: {path.parent} is not a directory") from None
    except IsADirectoryError:
        raise ChainError(f"{path}: is a directory, not a file") from None
    except OSError as exc:  # permissions, I/O errors
        raise ChainError(f"{path}: cannot be read: {exc.strerror or exc}") from None
    return raw


class Chain:
    """The writable chain of one validator. Open it with `Chain.open(dir, genesis)`."""

    def __init__(self, chain_dir: Path, genesis: dict[str, Any], blocks: list[StoredBlock],
                 recovered_bytes: int) -> None:
        self.dir = Path(chain_dir)
        self.genesis = genesis
        self.blocks = blocks
        self.recovered_bytes = recovered_bytes  # bytes of torn tail cut off by open()

    @classmethod
    def open(cls, chain_dir: Path, genesis: Mapping[str, Any] | None = None) -> Chain:
        """Open (creating if needed) a chain dir; recover a torn tail.

        With `genesis`, a new dir gets a copy of it and an existing dir must hold the same one.
        """
        d = Path(chain_dir)
        d.mkdir(parents=True, exist_ok=True)
        gpath = d / GENESIS_FILE
        if genesis is not None:
            if gpath.exists():
                if canonical_hash(load_genesis(d)) != canonical_hash(dict(genesis)):
                    raise ChainError(f"{gpath}: a different genesis is already there")
            else:
                atomic_write_bytes(gpath, canonical_bytes(dict(genesis)) + b"\n")
        gen = load_genesis(d)
        path = d / CHAIN_FILE
        raw = path.read_bytes() if path.exists() else b""
        blocks, good = _parse(path, raw, lenient_tail=True)
        recovered = len(raw) - good
        if recovered:
            with open(path, "rb+") as fh:
                fh.truncate(good)
                fh.flush()
                os.fsync(fh.fileno())
        elif not path.exists():
            path.touch()
            fsync_dir(d)
        return cls(d, gen, blocks, recovered)

    @property
    def height(self) -> int:
        return self.blocks[-1].height if self.blocks else 0

    @property
    def head_hash(self) -> str:
        return self.blocks[-1].hash if self.blocks else genesis_hash(self.genesis)

    def append(self, block: Block, certificate: Iterable[Mapping[str, Any]]) -> StoredBlock:
        """Append one block durably (flush + fsync) and return it as stored."""
        if block.height != self.height + 1 or block.prev != self.head_hash:
            raise ChainError(f"{self.dir}: block {block.height} does not extend head "
                             f"{self.height}")
        stored = StoredBlock(block, block.hash, tuple(dict(c) for c in certificate))
        with open(self.dir / CHAIN_FILE, "ab") as fh:
            fh.write(stored.encode_line())
            fh.flush()
            os.fsync(fh.fileno())
        self.blocks.append(stored)
        return stored

    def lines_after(self, height: int, limit: int | None = None) -> list[bytes]:
        """The stored lines of blocks height+1.. (what a lagging validator is sent), at most
        `limit` of them (only those are encoded)."""
        start = max(height, 0)
        end = None if limit is None else start + limit
        return [b.encode_line() for b in self.blocks[start:end]]


# --- readers --------------------------------------------------------------------------------------


def read_chain_tail(chain_dir: Path) -> tuple[list[StoredBlock], int]:
    """Every whole block in `chain_dir`, and how many bytes follow the last whole line."""
    path = Path(chain_dir) / CHAIN_FILE
    raw = _read_bytes(path)
    blocks, end = _parse(path, raw, lenient_tail=False)
    return blocks, len(raw) - end


def read_chain(chain_dir: Path) -> list[StoredBlock]:
    """Every whole block in `chain_dir`, in order (a torn tail is ignored, not repaired)."""
    return read_chain_tail(chain_dir)[0]


def head(chain_dir: Path) -> tuple[int, str]:
    """(height, hash) of the last block; (0, genesis hash) for an empty chain."""
    blocks = read_chain(chain_dir)
    if blocks:
        return blocks[-1].height, blocks[-1].hash
    return 0, genesis_hash(load_genesis(Path(chain_dir)))


def record_id_of(record: Mapping[str, Any]) -> str:
    """The record id of a record dict as stored in a block (same as SignedRecord.record_id)."""
    return sha256_hex(canonical_bytes(dict(record)))


def find_records(chain_dir: Path, record_ids: Iterable[str]) -> dict[str, int]:
    """{record_id: height} for each of `record_ids` that is final in `chain_dir`."""
    wanted = set(record_ids)
    found: dict[str, int] = {}
    for stored in read_chain(chain_dir):
        for rec in stored.block.records:
            rid = record_id_of(rec)
            if rid in wanted and rid not in found:
                found[rid] = stored.height
    return found
