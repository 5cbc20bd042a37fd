"""The validators as one MPI job: rank r is validator r of genesis, with its own key and chain.

Heights are decided one at a time in rounds, a simple Tendermint-like structure:

1. The proposer of (height, round), `validators[(height + round) % n]`, reads the signed inbox
   (ordered by file mtime_ns then name, so a record posted after the one it depends on comes
   after it), skips records already on chain, tries each on a copy of the state (on which
   `begin_block(height, head hash)` was called, as every voter will) and proposes a block of
   the valid ones. Records that are invalid *now* stay pending (a verdict whose batch commit,
   or whose sample block, is not final yet); records that can never be valid (undecodable,
   bad signature, replayed, an id already taken) move to INBOX/rejected/ with a `.reason`
   file. So does a record that raises any other exception while it is decoded or checked: a
   record never crashes the proposer.
2. The proposal (a block, "nothing" or "stop") is broadcast. Every rank re-validates the whole
   block itself (signatures, transitions, state_hash) and signs a precommit, or votes nil: any
   exception while checking a block is a nil vote, never a crashed rank.
3. Votes are all-gathered. More than 2/3 of the validator weight commits: every rank appends
   block + certificate with fsync, and rank 0 writes DATADIR/head.json. Otherwise the round
   advances and the next validator proposes.

On start, ranks all-gather their heights and any rank behind fetches the missing blocks from
the most advanced one, checking hashes, certificates and transitions before appending.
Stop: when INBOX/STOP exists and the proposer has nothing valid to propose.

Waiting ranks sleep-poll (`iprobe` + sleep) instead of blocking in MPI collectives: MPICH
busy-waits, and validators are often oversubscribed (4 ranks on 2 cores), where a spinning
rank steals the CPU the proposer needs to verify signatures.

Limits (a later issue hardens them): a crashed rank aborts the job; no timeouts for a proposer
that hangs; no prevote/lock phase, so safety relies on the synchronous lockstep of one job.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mpi4py import MPI

from gonka_hpc.errors import GonkaError
from gonka_hpc.fileutil import atomic_write_bytes, atomic_write_text
from gonka_hpc.identity import Identity
from gonka_hpc.records import SignedRecord

from .audit import audit_chain
from .block import (
    Block,
    InvalidBlock,
    check_block,
    check_certificate,
    genesis_hash,
    has_quorum,
    make_certificate,
    proposer_index,
    sign_precommit,
)
from .chain import Chain, StoredBlock
from .state import EpochState, InvalidRecord

STOP_FILE = "STOP"
REJECTED_DIR = "rejected"
COMMITTED_DIR = "committed"
POLL_S = 0.0005
_TAG_BCAST, _TAG_GATHER = 11, 12


@dataclass(frozen=True)
class RunConfig:
    """What `python -m ledger run` was asked to do."""

    genesis_path: Path
    keys: Path
    data: Path
    inbox: Path
    interval: float = 0.05  # seconds the network idles when there is nothing to propose
    expect_size: int | None = None
    max_block_records: int = 1000


# --- sleep-polling collectives ------------------------------------------------------------------


def _wait_sends(reqs: list[MPI.Request]) -> None:
    while reqs and not MPI.Request.Testall(reqs):
        time.sleep(POLL_S)


def _recv(comm: MPI.Comm, source: int, tag: int) -> Any:
    while not comm.iprobe(source=source, tag=tag):
        time.sleep(POLL_S)
    return comm.recv(source=source, tag=tag)


def bcast(comm: MPI.Comm, obj: Any, root: int) -> Any:
    """`comm.bcast`, but waiting ranks sleep instead of spinning."""
    rank, size = comm.Get_rank(), comm.Get_size()
    if rank == root:
        _wait_sends([comm.isend(obj, dest=r, tag=_TAG_BCAST) for r in range(size) if r != root])
        return obj
    return _recv(comm, root, _TAG_BCAST)


def allgather(comm: MPI.Comm, obj: Any) -> list[Any]:
    """`comm.allgather`, but waiting ranks sleep instead of spinning."""
    rank, size = comm.Get_rank(), comm.Get_size()
    reqs = [comm.isend(obj, dest=r, tag=_TAG_GATHER) for r in range(size) if r != rank]
    out = [obj if r == rank else _recv(comm, r, _TAG_GATHER) for r in range(size)]
    _wait_sends(reqs)
    return out


def exchange_votes(comm: MPI.Comm, validators: list[dict[str, Any]], block: Block,
                   my_vote: dict[str, Any] | None) -> list[dict[str, Any]]:
    """All-gather precommits; return the certificate (valid yes votes by index)."""
    return make_certificate(validators, block, allgather(comm, my_vote))


# --- the inbox, seen from the proposer -------------------------------------------------------------


def pending_files(inbox: Path) -> list[Path]:
    """Record files in the inbox, oldest first (mtime_ns, then name)."""
    entries = []
    for p in Path(inbox).glob("*.json"):
        if p.name.startswith("."):
            continue  # a post in progress (fileutil temp file)
        try:
            entries.append((p.stat().st_mtime_ns, p.name, p))
        except FileNotFoundError:
            continue
    return [p for _, _, p in sorted(entries)]


def _move(path: Path, subdir: str) -> Path:
    target = path.parent / subdir / path.name
    target.parent.mkdir(exist_ok=True)
    try:
        path.replace(target)
    except FileNotFoundError:
        pass
    return target


def _describe(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, GonkaError) else f"{type(exc).__name__}: {exc}"


def reject(path: Path, reason: str) -> None:
    """Move a record that can never be valid to INBOX/rejected/, with NAME.reason beside it."""
    target = _move(path, REJECTED_DIR)
    atomic_write_text(target.with_name(target.name + ".reason"), reason + "\n")


# --- one validator ------------------------------------------------------------------------------


class Validator:
    """Rank `comm.rank` of the validator job: its key, chain, state and the round loop."""

    def __init__(self, comm: MPI.Comm, cfg: RunConfig, genesis: dict[str, Any]) -> None:
        self.comm, self.cfg, self.genesis = comm, cfg, genesis
        self.rank = comm.Get_rank()
        self.validators: list[dict[str, Any]] = genesis["validators"]
        self.n = len(self.validators)
        me = self.validators[self.rank]
        self.identity = Identity.load(cfg.keys / f"validator-{self.rank}.key")
        if self.identity.public_hex != me["pubkey"]:
            raise GonkaError(f"{cfg.keys}/validator-{self.rank}.key is not the key of genesis "
                             f"validator {self.rank} ('{me['name']}')")
        self.name = me["name"]
        self.chain = Chain.open(cfg.data / f"validator-{self.rank}", genesis)
        if self.chain.recovered_bytes:
            self.log(f"recovered a torn chain tail ({self.chain.recovered_bytes} bytes cut)")
        self.state: EpochState = audit_chain(self.chain.dir).state

    def log(self, msg: str) -> None:
        sys.stderr.write(f"[validator-{self.rank}] {msg}\n")  # one write: no interleaving
        sys.stderr.flush()

    # --- start: catch up with the most advanced rank ------------------------------------------

    def catch_up(self) -> None:
        heights = allgather(self.comm, self.chain.height)
        top = max(heights)
        low = min(heights)
        # Every chain must agree up to the shortest one: otherwise the dirs have forked.
        at_low = self.chain.blocks[low - 1].hash if low else genesis_hash(self.genesis)
        hashes = allgather(self.comm, at_low)
        if len(set(hashes)) != 1:
            raise InvalidBlock(f"validator chains disagree at height {low}: "
                               f"{[h[:12] for h in hashes]} (fork; restore from a good copy)",
                               height=low)
        if top == low:
            return
        best = heights.index(top)
        lines = bcast(self.comm, self.chain.lines_after(low) if self.rank == best else None,
                      best)
        mine = self.chain.height
        for line in lines[mine - low:]:
            stored = StoredBlock.decode_line(line.rstrip(b"\n"))
            block = stored.block
            if stored.hash != block.hash:
                raise InvalidBlock("catch-up block hash mismatch", height=block.height)
            check_certificate(self.validators, block, stored.certificate)
            self.state = check_block(self.state, block, height=self.chain.height + 1,
                                     prev=self.chain.head_hash)
            self.chain.append(block, stored.certificate)
        if mine < top:
            self.log(f"caught up from height {mine} to {top} (blocks from validator-{best})")

    # --- proposing --------------------------------------------------------------------------

    def _trial(self, height: int, accepted: list[SignedRecord]) -> EpochState:
        """A copy of the state with block `height` begun and `accepted` applied."""
        trial = self.state.copy()
        trial.begin_block(height, self.chain.head_hash)
        for rec in accepted:
            trial.apply(rec)
        return trial

    def propose(self, height: int, round_: int) -> tuple[str, Any]:
        stop_requested = (self.cfg.inbox / STOP_FILE).exists()  # before listing: no lost posts
        trial: EpochState | None = None  # made on the first candidate: idle polls stay cheap
        accepted: list[SignedRecord] = []
        for path in pending_files(self.cfg.inbox):
            try:
                raw = path.read_bytes()
            except FileNotFoundError:
                continue
            except OSError as exc:
                self.log(f"cannot read {path.name}: {exc}")
                continue
            try:
                rec = SignedRecord.decode(raw)
                rid = rec.record_id
            except Exception as exc:  # noqa: BLE001 - any undecodable record, whatever the error
                reject(path, f"undecodable record: {_describe(exc)}")
                continue
            if self.state.has_applied(rid):
                _move(path, COMMITTED_DIR)  # final already: out of the way of later proposals
                continue
            if trial is None:
                trial = self._trial(height, accepted)
            if trial.has_applied(rid):
                continue  # the same record under another file name, already in this block
            try:
                trial.apply(rec)
            except InvalidRecord as exc:
                if exc.permanent:
                    reject(path, exc.reason)
                continue  # not valid yet: stays pending
            except Exception as exc:  # noqa: BLE001 - a record must never crash the proposer
                reject(path, f"{rec.kind} record could not be checked: {_describe(exc)}")
                trial = self._trial(height, accepted)  # the failed check may have left marks
                continue
            accepted.append(rec)
            if len(accepted) >= self.cfg.max_block_records:
                break
        if accepted and trial is not None:
            block = Block(height, round_, self.chain.head_hash, self.name,
                          tuple(r.to_dict() for r in accepted), trial.state_hash())
            return ("block", block.to_dict())
        return ("stop", None) if stop_requested else ("nothing", None)

    # --- the round loop ---------------------------------------------------------------------

    def write_head(self) -> None:
        if self.rank == 0:
            atomic_write_bytes(self.cfg.data / "head.json", json.dumps(
                {"height": self.chain.height, "hash": self.chain.head_hash}).encode() + b"\n")

    def run(self) -> None:
        self.catch_up()
        self.write_head()
        self.log(f"ready at height {self.chain.height} ({self.n} validators)")
        round_ = 0
        while True:
            height = self.chain.height + 1
            proposer = proposer_index(height, round_, self.n)
            msg = self.propose(height, round_) if self.rank == proposer else None
            kind, payload = bcast(self.comm, msg, proposer)
            if kind == "stop":
                self.log(f"stopping at height {self.chain.height}")
                return
            if kind == "nothing":
                time.sleep(self.cfg.interval)
                continue
            block: Block | None = None
            new_state: EpochState | None = None
            vote: dict[str, Any] | None = None
            try:
                block = Block.from_dict(payload)
                new_state = check_block(self.state, block, height=height,
                                        prev=self.chain.head_hash, round_=round_)
                vote = sign_precommit(self.identity, self.rank, block)
            except Exception as exc:  # noqa: BLE001 - an invalid block is a nil vote, not a crash
                reason = exc.reason if isinstance(exc, InvalidBlock) else _describe(exc)
                self.log(f"nil vote at height {height} round {round_}: {reason}")
                new_state, vote = None, None
            votes = allgather(self.comm, vote)
            cert = make_certificate(self.validators, block, votes) if block is not None else []
            if not has_quorum(self.validators, [c["index"] for c in cert]):
                self.log(f"height {height} round {round_}: no quorum, next round")
                round_ += 1
                continue
            if new_state is None or block is None:
                raise InvalidBlock("a block this validator judged invalid was committed by a "
                                   "quorum; its state diverged", height=height)
            self.chain.append(block, cert)
            self.state = new_state
            self.write_head()
            self.log(f"committed height {height}: {len(block.records)} records, round "
                     f"{round_}, {len(cert)}/{self.n} votes, hash {block.hash[:12]}")
            round_ = 0


def run(cfg: RunConfig) -> int:
    """Entry point of one rank. Any error aborts the whole job so no rank waits forever."""
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    try:
        genesis = json.loads(Path(cfg.genesis_path).read_bytes())
        n = len(genesis["validators"])
        size = comm.Get_size()
        if size != n or (cfg.expect_size is not None and size != cfg.expect_size):
            raise GonkaError(
                f"MPI world has {size} ranks but genesis has {n} validators"
                + (f" and --expect-size is {cfg.expect_size}" if cfg.expect_size else "")
                + ": start one rank per validator (mpiexec -n N, or srun --mpi=pmi2 -n N); a "
                "wrong launcher starts N single-rank worlds")
        Validator(comm, cfg, genesis).run()
    except BaseException as exc:  # noqa: BLE001 - the boundary of a rank: abort everyone
        if isinstance(exc, GonkaError):
            sys.stderr.write(f"[validator-{rank}] ERROR {exc}\n")
        else:
            sys.stderr.write(f"[validator-{rank}] " + traceback.format_exc())
        sys.stderr.flush()
        comm.Abort(1)
    return 0
