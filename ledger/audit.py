"""Offline audit of validator chain dirs: what `python -m ledger verify-chain` runs.

For each block, in order: the line is the canonical encoding of the stored block, the stored
hash equals the block's hash, the block links to the one before it (height 1 to the hash of
genesis.json), its proposer is the one the rotation names, its commit certificate carries more
than 2/3 of the genesis validators' weight with signatures that verify, and replaying its
records on the state before it (after `begin_block(height, prev)`, exactly as consensus does;
every record signature and every state transition) gives the block's `state_hash`. Any error
while checking a block is reported as an InvalidBlock at its height, never a crash.

A chain dir only proves that it is a valid chain of the genesis.json it holds: an auditor who
knows the network's genesis pins it (`expected_genesis`), expects one chain dir per genesis
validator (`chain_dirs_of`), and checks the heads that others published (`check_head`:
DATA/head.json, a run's summary.json) so that a chain missing its last blocks is caught.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gonka_hpc.errors import GonkaError

from .block import InvalidBlock, check_block, check_certificate, genesis_hash
from .chain import (
    CHAIN_FILE,
    GENESIS_FILE,
    ChainError,
    StoredBlock,
    load_genesis,
    read_chain_tail,
)
from .state import EpochState

NEWLINE = b"\n"
HEAD_FILE = "head.json"


@dataclass(frozen=True)
class AuditResult:
    """A chain dir that passed the audit, and what it holds."""

    dir: Path
    height: int
    head_hash: str
    n_records: int
    state: EpochState  # the state after the last block
    torn_bytes: int  # bytes after the last whole line (a crash or an append in progress)
    blocks: tuple[StoredBlock, ...] = field(default=(), repr=False)  # as checked

    def summary(self) -> str:
        tail = (f", {self.torn_bytes} torn tail bytes ignored (a half-written last line)"
                if self.torn_bytes else "")
        closed = ", epoch closed" if self.state.closed else ""
        return (f"OK {self.dir}: height {self.height}, {self.n_records} records, "
                f"head {self.head_hash[:16]}, state {self.state.state_hash()[:16]}"
                f"{closed}{tail}")

    def hash_at(self, height: int) -> str | None:
        """The hash of block `height` (genesis's for 0), or None beyond the head."""
        if height == 0:
            return self.state.genesis_hash
        if 1 <= height <= len(self.blocks):
            return self.blocks[height - 1].hash
        return None


def state_of(genesis: Mapping[str, Any], where: Path | str) -> EpochState:
    """The state before the first block; ChainError naming `where` for a bad genesis."""
    try:
        return EpochState.from_genesis(genesis)
    except (GonkaError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ChainError(f"{where}: bad genesis: {exc}") from None


def audit_chain(chain_dir: Path, *, expected_genesis: Mapping[str, Any] | None = None,
                genesis_source: Path | str = "the expected genesis") -> AuditResult:
    """Verify one chain dir completely; raise InvalidBlock (with its height) or ChainError.

    With `expected_genesis`, the dir's genesis.json must hold that document (the same
    canonical hash): otherwise the chain proves nothing about the network in question."""
    d = Path(chain_dir)
    if not d.is_dir():
        raise ChainError(f"{d}: {'not a directory' if d.exists() else 'not found'}")
    genesis = load_genesis(d)
    if expected_genesis is not None and genesis_hash(genesis) != genesis_hash(expected_genesis):
        raise ChainError(f"{d / GENESIS_FILE}: not the genesis of {genesis_source} (another "
                         f"network's chain?): genesis hash {genesis_hash(genesis)} vs "
                         f"{genesis_hash(expected_genesis)}")
    state = state_of(genesis, d / GENESIS_FILE)
    blocks, torn = read_chain_tail(d)
    prev = genesis_hash(genesis)
    n_records = 0
    for i, stored in enumerate(blocks, start=1):
        block = stored.block
        if stored.hash != block.hash:
            raise InvalidBlock(f"stored hash {stored.hash} is not the block's hash "
                               f"{block.hash}", height=i)
        if block.height != i:
            raise InvalidBlock(f"line {i} holds height {block.height}", height=i)
        check_certificate(state.validators, block, stored.certificate)
        state = check_block(state, block, height=i, prev=prev)
        prev = stored.hash
        n_records += len(block.records)
    return AuditResult(d, len(blocks), prev, n_records, state, torn, tuple(blocks))


def chain_dirs_of(data_dir: Path, n_validators: int) -> tuple[list[Path], list[str]]:
    """The chain dirs DATA/validator-<i> of a network of `n_validators`, and a problem for
    each one that is missing (no chain.log) or that genesis has no validator for."""
    data_dir = Path(data_dir)
    dirs: list[Path] = []
    problems: list[str] = []
    for i in range(n_validators):
        d = data_dir / f"validator-{i}"
        if (d / CHAIN_FILE).is_file():
            dirs.append(d)
        elif d.is_dir() and (d / CHAIN_FILE).exists():
            dirs.append(d)  # chain.log is not a file: the audit of the dir says so
        else:
            why = "no chain.log" if d.is_dir() else "missing"
            problems.append(f"{d}: {why}: genesis has {n_validators} validators, every one "
                            "keeps a chain dir")
    expected = {f"validator-{i}" for i in range(n_validators)}
    for extra in sorted(data_dir.glob("validator-*")):
        if extra.name not in expected:
            problems.append(f"{extra}: genesis has no validator {extra.name.split('-', 1)[1]} "
                            f"(it has {n_validators})")
    return dirs, problems


def read_head_file(path: Path) -> tuple[int, str]:
    """(height, hash) from a head.json {"height", "hash"}; ChainError if it is not one."""
    try:
        data = json.loads(Path(path).read_bytes())
        height, hash_ = data["height"], data["hash"]
    except OSError as exc:
        raise ChainError(f"{path}: cannot be read: {exc.strerror or exc}") from None
    except (ValueError, RecursionError, TypeError, KeyError) as exc:
        raise ChainError(f"{path}: not a head file {{\"height\", \"hash\"}}: {exc!r}") \
            from None
    if type(height) is not int or height < 0 or not isinstance(hash_, str):
        raise ChainError(f"{path}: not a head file {{\"height\", \"hash\"}}")
    return height, hash_


def check_head(result: AuditResult, height: int, hash_: str, source: str, *,
               exact: bool = False) -> str | None:
    """A problem if the chain does not hold block `height` with hash `hash_` (as `source`
    says), or (with `exact`) holds blocks beyond it; None if it agrees."""
    have = result.hash_at(height)
    if have is None:
        return (f"{result.dir}: chain ends at height {result.height}, but {source} says "
                f"height {height} (blocks missing from the end?)")
    if have != hash_:
        return (f"{result.dir}: block {height} has hash {have}, but {source} says {hash_}")
    if exact and result.height != height:
        return (f"{result.dir}: chain goes on to height {result.height} after the head "
                f"{source} names (height {height})")
    return None


def check_head_file(data_dir: Path, results: list[AuditResult]) -> list[str]:
    """Problems where a chain falls short of DATA/head.json (rank 0 writes it after each
    commit; a chain may be ahead of it, never behind). Empty if there is no head.json."""
    path = Path(data_dir) / HEAD_FILE
    if not path.exists():
        return []
    try:
        height, hash_ = read_head_file(path)
    except ChainError as exc:
        return [str(exc)]
    return [p for r in results if (p := check_head(r, height, hash_, str(path))) is not None]


def compare_dirs(dirs: list[Path]) -> list[str]:
    """Problems making the dirs disagree (empty if they agree).

    They agree when genesis.json is byte-identical and chain.log holds the same blocks, line
    by line. The certificates may differ: each validator stores the precommits it collected
    (honest validators that all hear each other store the same ones, so their chain.log files
    are byte-identical; `identical_logs` tells). A file that cannot be read is a problem.
    """
    problems: list[str] = []
    first = Path(dirs[0])
    for name in (GENESIS_FILE, CHAIN_FILE):
        ref = _bytes_or_problem(first / name, problems)
        if ref is None:
            continue
        for other in dirs[1:]:
            data = _bytes_or_problem(Path(other) / name, problems)
            if data is None or data == ref:
                continue
            same = name == CHAIN_FILE and _block_hashes(first) is not None
            if same and _block_hashes(first) == _block_hashes(Path(other)):
                continue  # same blocks, other certificates (or a torn tail)
            n = min(len(ref), len(data))
            at = next((i for i in range(n) if ref[i] != data[i]), n)
            if at == n:
                what = f"one is a prefix of the other ({len(data)} vs {len(ref)} bytes)"
            else:
                what = f"differs at byte {at}"
            if name == CHAIN_FILE and at < n:
                what += f" (height {ref[:at].count(NEWLINE) + 1})"
            problems.append(f"{Path(other) / name} vs {first / name}: {what}")
    return problems


def _bytes_or_problem(path: Path, problems: list[str]) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError as exc:
        problem = f"{path}: cannot be read: {exc.strerror or exc}"
        if problem not in problems:
            problems.append(problem)
        return None


def identical_logs(dirs: list[Path]) -> bool:
    """Whether every dir's chain.log is byte-identical (certificates included)."""
    logs = {(Path(d) / CHAIN_FILE).read_bytes() for d in dirs}
    return len(logs) == 1


def agreement(results: list[AuditResult]) -> str:
    """How chains that hold the same blocks agree: byte for byte, or in what they differ."""
    logs = set()
    for r in results:
        try:
            logs.add((r.dir / CHAIN_FILE).read_bytes())
        except OSError:
            logs.add(b"")
    if len(logs) == 1:
        return f"{len(results)} chain dirs are byte-identical"
    what = []
    certs = [[b.certificate for b in r.blocks] for r in results]
    if any(c != certs[0] for c in certs[1:]):
        what.append("their certificates differ: each validator keeps the precommits it "
                    "collected")
    if any(r.torn_bytes for r in results):
        what.append("some have a torn tail")
    return (f"{len(results)} chain dirs hold the same blocks ("
            + ("; ".join(what) or "their chain.log bytes differ") + ")")


def _block_hashes(chain_dir: Path) -> list[tuple[str, str]] | None:
    """(stored hash, the block's own hash) of every block: a block edited under a kept
    stored hash is not the same block."""
    try:
        return [(s.hash, s.block.hash) for s in read_chain_tail(chain_dir)[0]]
    except ChainError:
        return None


def expand_data_dirs(paths: list[Path]) -> list[tuple[Path | None, list[Path]]]:
    """For each path: (None, [path]) for a chain dir named directly, (data dir, its
    validator-* subdirs that hold a chain.log) for a data dir."""
    out: list[tuple[Path | None, list[Path]]] = []
    for p in map(Path, paths):
        if not (p / CHAIN_FILE).exists() and p.is_dir():
            subs = sorted(s for s in p.glob("validator-*") if (s / CHAIN_FILE).exists())
            if subs or any(p.glob("validator-*")):
                out.append((p, subs))
                continue
        out.append((None, [p]))
    return out


def genesis_of_data_dir(data_dir: Path, subs: list[Path],
                        pinned: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """The genesis that says how many chain dirs a data dir must hold: the pinned one, or
    (trusting the dirs, as verify-chain without --genesis does) its first chain dir's."""
    if pinned is not None:
        return pinned
    if not subs:
        raise ChainError(f"{data_dir}: no validator-*/chain.log (give --genesis to say "
                         "which validators to expect)")
    return load_genesis(subs[0])

