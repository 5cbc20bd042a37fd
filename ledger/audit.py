"""Offline audit of validator chain dirs: what `python -m ledger verify-chain` runs.

For each block, in order: the stored hash equals the block's hash, the block links to the one
before it (height 1 to the hash of genesis.json), its proposer is the one the rotation names,
its commit certificate carries more than 2/3 of the genesis validators' weight with signatures
that verify, and replaying its records on the state before it (after `begin_block(height,
prev)`, exactly as consensus does; every record signature and every state transition) gives the
block's `state_hash`. Any error while checking a block is reported as an InvalidBlock at its
height, never a crash. Anyone with the dir can run it; it trusts nothing but genesis.json.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gonka_hpc.errors import GonkaError

from .block import InvalidBlock, check_block, check_certificate, genesis_hash
from .chain import CHAIN_FILE, GENESIS_FILE, ChainError, load_genesis, read_chain_tail
from .state import EpochState

NEWLINE = b"\n"


@dataclass(frozen=True)
class AuditResult:
    """A chain dir that passed the audit, and what it holds."""

    dir: Path
    height: int
    head_hash: str
    n_records: int
    state: EpochState  # the state after the last block
    torn_bytes: int  # bytes after the last whole line (a crash or an append in progress)

    def summary(self) -> str:
        tail = f", {self.torn_bytes} torn tail bytes ignored" if self.torn_bytes else ""
        closed = ", epoch closed" if self.state.closed else ""
        return (f"OK {self.dir}: height {self.height}, {self.n_records} records, "
                f"head {self.head_hash[:16]}, state {self.state.state_hash()[:16]}"
                f"{closed}{tail}")


def audit_chain(chain_dir: Path) -> AuditResult:
    """Verify one chain dir completely; raise InvalidBlock (with its height) or ChainError."""
    d = Path(chain_dir)
    genesis = load_genesis(d)
    try:
        state = EpochState.from_genesis(genesis)
    except (GonkaError, KeyError, TypeError, ValueError) as exc:
        raise ChainError(f"{d / GENESIS_FILE}: bad genesis: {exc}") from None
    blocks, torn = read_chain_tail(d)
    prev = genesis_hash(genesis)
    n_records = 0
    for i, stored in enumerate(blocks, start=1):
        block = stored.block
        if stored.hash != block.hash:
            raise InvalidBlock(f"stored hash {stored.hash[:16]} is not the block's hash "
                               f"{block.hash[:16]}", height=i)
        if block.height != i:
            raise InvalidBlock(f"line {i} holds height {block.height}", height=i)
        check_certificate(state.validators, block, stored.certificate)
        state = check_block(state, block, height=i, prev=prev)
        prev = stored.hash
        n_records += len(block.records)
    return AuditResult(d, len(blocks), prev, n_records, state, torn)


def compare_dirs(dirs: list[Path]) -> list[str]:
    """Problems making the dirs disagree (empty if they agree).

    They agree when genesis.json is byte-identical and chain.log holds the same blocks, line
    by line. The certificates may differ: each validator stores the precommits it collected
    (honest validators that all hear each other store the same ones, so their chain.log files
    are byte-identical; `identical_logs` tells).
    """
    problems: list[str] = []
    first = Path(dirs[0])
    for name in (GENESIS_FILE, CHAIN_FILE):
        ref = (first / name).read_bytes()
        for other in dirs[1:]:
            data = (Path(other) / name).read_bytes()
            if data == ref:
                continue
            if name == CHAIN_FILE and _block_hashes(first) == _block_hashes(Path(other)):
                continue  # same blocks, other certificates
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


def identical_logs(dirs: list[Path]) -> bool:
    """Whether every dir's chain.log is byte-identical (certificates included)."""
    logs = {(Path(d) / CHAIN_FILE).read_bytes() for d in dirs}
    return len(logs) == 1


def _block_hashes(chain_dir: Path) -> list[str] | None:
    try:
        return [s.hash for s in read_chain_tail(chain_dir)[0]]
    except ChainError:
        return None


def expand_dirs(paths: list[Path]) -> list[Path]:
    """Chain dirs named directly, or a data dir's validator-* subdirs."""
    out: list[Path] = []
    for p in map(Path, paths):
        if not (p / CHAIN_FILE).exists() and p.is_dir():
            subs = sorted(s for s in p.glob("validator-*") if (s / CHAIN_FILE).exists())
            if subs:
                out.extend(subs)
                continue
        out.append(p)
    return out
