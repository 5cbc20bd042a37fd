"""The validators as one MPI job: rank r is validator r of genesis, with its own key and chain.

Each height is decided by Tendermint rounds (`ledger.rounds`: propose, prevote, precommit,
locking, growing timeouts, a proposer chosen by weight). This module is the driver around
that state machine: it moves signed messages between ranks, checks blocks against the state,
reads the inbox, writes the chain and catches up.

Messages are point-to-point (`Isend` to every other rank, `Iprobe` + `Recv`), never
collectives, so a rank that is silent, slow or Byzantine cannot block the others. They
travel as byte frames (`ledger.wire`: a JSON header and raw bytes, never pickle, so a
Byzantine rank cannot run code on the others). Waiting ranks sleep-poll (MPICH
busy-waits, and validators are often oversubscribed, 4 ranks on 2 cores, where a spinning
rank steals the CPU the proposer needs). Messages, as tuples:
  ("P", height, round, block bytes, valid_round, index, signature, record lengths)
                                  a proposal (the lengths: an unsigned parsing hint)
  ("V", step, height, round, block_hash, index, signature)           a prevote / precommit
  ("S", height, index)            stop-ready: STOP exists and nothing is pending here
  ("Q", height)                   sync request: send me your blocks after `height`
  ("B", [chain.log lines])        sync answer: committed blocks with their certificates

The inbox (`ledger.mempool`) is read by every rank. A rank has work when a pending record
passes the state's check; only then does it run the propose timeout, so an idle network does
not churn rounds. The proposer of a round builds its block from the pending records that pass
on a trial state; everyone checks it (`check_block`: signatures, transitions, state hash)
before prevoting it, once per block hash. A decided block waits up to `timeouts.commit` for
the precommits of every validator heard at the previous height, so honest ranks store the
same certificate (their chain.log files stay byte-identical), then it is appended with fsync;
rank 0 writes DATADIR/head.json.

Catch-up: on start, ranks compare heights and hashes (a fork stops the job) and the lagging
ones fetch blocks from the most advanced. While running, a rank that hears a message for a
later height asks that peer for its blocks ("Q"/"B") and checks each (hash, certificate,
transitions) before appending. Every vote that is news to a rank is relayed to the others
(but its voter), so a validator that sends different votes to different peers is heard both
ways, also when the second half comes just after we committed the height (`_late_vote`);
equivocation (two signed votes of one validator for one height, round and step) is posted
to the inbox as an `equivocation_evidence` record. Messages for the next two heights
are buffered within a budget per sender (FUTURE_PROPOSALS, FUTURE_VOTES_PER_VOTER).

Stop: when INBOX/STOP exists and a rank has nothing pending it tells the others ("S"); all
ranks exit 0 once every validator said so at the same height. A validator that stays silent
keeps the job from stopping cleanly (kill it: the chains are crash-safe).

Any exception in a rank aborts the job (MPI Abort), so no rank waits on a dead one.
`--fault-injection FILE` (`ledger.faults`) makes chosen ranks misbehave: tests only.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mpi4py import MPI

from gonka_hpc.canonical import sha256_hex
from gonka_hpc.errors import GonkaError
from gonka_hpc.fileutil import atomic_write_bytes
from gonka_hpc.identity import Identity, is_valid_signature
from gonka_hpc.inbox import post
from gonka_hpc.records import EquivocationEvidence, SignedRecord, sign_record

from . import wire
from .audit import audit_chain
from .block import Block, InvalidBlock, check_block, check_certificate, genesis_hash
from .chain import Chain, StoredBlock, load_genesis_file
from .faults import Fault, garbage_frames, load_faults
from .mempool import Mempool, describe
from .rounds import Height, Proposal, Timeouts, Vote, sign_vote
from .sigcache import record_signed_by
from .state import EpochState, InvalidRecord
from .votes import NIL, dumps_canonical

STOP_FILE = "STOP"
POLL_S = 0.0005
IDLE_POLL_S = 0.002  # the longest sleep of a rank with nothing to do and nothing in flight
SYNC_BATCH = 64  # most blocks in one sync answer
FUTURE_PROPOSALS = 4  # proposals (and stop notes) kept per sender for a height not reached
FUTURE_VOTES_PER_VOTER = 16  # votes of one validator kept per sender for such a height
_TAG_BCAST, _TAG_GATHER, _TAG_MSG = 11, 12, 13
# What a message from a peer may raise while it is parsed and judged: logged and dropped.
# Anything else is a bug in this validator, and aborts the job.
BAD_MESSAGE = (InvalidBlock, InvalidRecord, ValueError, TypeError, KeyError, IndexError,
               OverflowError, RecursionError)


@dataclass(frozen=True)
class RunConfig:
    """What `python -m ledger run` was asked to do."""

    genesis_path: Path
    keys: Path
    data: Path
    inbox: Path
    interval: float = 0.05  # seconds between inbox scans when nothing is pending
    expect_size: int | None = None
    max_block_records: int = 1000
    timeouts: Timeouts = field(default_factory=Timeouts)
    fault_injection: Path | None = None  # TEST ONLY: see ledger.faults


# --- sleep-polling collectives (used once, at start) ----------------------------------------------


def _wait_sends(reqs: list[MPI.Request], timeout: float | None = None) -> bool:
    deadline = None if timeout is None else time.monotonic() + timeout
    while reqs and not MPI.Request.Testall(reqs):
        if deadline is not None and time.monotonic() > deadline:
            return False
        time.sleep(POLL_S)
    return True


def isend_bytes(comm: MPI.Comm, frame: bytes, dest: int, tag: int) -> MPI.Request:
    """Send one frame (`ledger.wire`) as a byte buffer (the request keeps it alive)."""
    return comm.Isend([frame, MPI.BYTE], dest=dest, tag=tag)


def recv_bytes(comm: MPI.Comm, status: MPI.Status, tag: int) -> bytes:
    """Receive the byte message `status` (from a successful Iprobe) describes."""
    buf = bytearray(status.Get_count(MPI.BYTE))
    comm.Recv([buf, MPI.BYTE], source=status.Get_source(), tag=tag)
    return bytes(buf)


def _recv(comm: MPI.Comm, source: int, tag: int) -> tuple[list[Any], bytes]:
    status = MPI.Status()
    while not comm.Iprobe(source=source, tag=tag, status=status):
        time.sleep(POLL_S)
    return wire.decode(recv_bytes(comm, status, tag))


def bcast(comm: MPI.Comm, value: Any, root: int, payload: bytes = b"") -> tuple[Any, bytes]:
    """`comm.bcast` of a JSON value and raw bytes, without pickle, and waiting ranks sleep
    instead of spinning. Returns (value, payload) as the root gave them."""
    rank, size = comm.Get_rank(), comm.Get_size()
    if rank == root:
        frame = wire.encode(["bcast", value], payload)
        _wait_sends([isend_bytes(comm, frame, r, _TAG_BCAST) for r in range(size) if r != root])
        return value, payload
    header, got = _recv(comm, root, _TAG_BCAST)
    return header[1], got


def allgather(comm: MPI.Comm, value: Any) -> list[Any]:
    """`comm.allgather` of a JSON value, without pickle; waiting ranks sleep."""
    rank, size = comm.Get_rank(), comm.Get_size()
    frame = wire.encode(["gather", value])
    reqs = [isend_bytes(comm, frame, r, _TAG_GATHER) for r in range(size) if r != rank]
    out = [value if r == rank else _recv(comm, r, _TAG_GATHER)[0][1] for r in range(size)]
    _wait_sends(reqs)
    return out


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """The cyclic garbage collector off during a burst of objects that live on (decoded
    records until they are final, the state a block leads to), and what survives frozen
    (`gc.freeze()`): the collector would walk each of them in every generation for nothing.
    They make no reference cycles, so refcounting frees them when they go."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


# --- one validator --------------------------------------------------------------------------------


class Validator:
    """Rank `comm.rank` of the validator job: its key, chain, state, inbox and consensus."""

    def __init__(self, comm: MPI.Comm, cfg: RunConfig, genesis: dict[str, Any],
                 faults: dict[int, Fault] | None = None) -> None:
        self.comm, self.cfg, self.genesis = comm, cfg, genesis
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
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
        self.fault = (faults or {}).get(self.rank)
        self.mempool = Mempool(cfg.inbox)
        self._stop_path = cfg.inbox / STOP_FILE
        self._sends: list[MPI.Request] = []
        # height -> (sender, message) kept for it; (height, sender, voter | -1 | -2) -> count
        self._future: dict[int, list[tuple[int, tuple[Any, ...]]]] = {}
        self._future_count: dict[tuple[int, int, int], int] = {}
        self._checked: dict[str, EpochState | None] = {}  # block hash -> state after it
        self._rids: dict[str, list[str]] = {}  # block hash -> its record ids
        self._decoded: dict[str, list[SignedRecord]] = {}  # block hash -> its records
        self._begun_state: EpochState | None = None
        self._ahead: tuple[int, float] | None = None  # (peer, since) a peer is at a later height
        self._work: bool | None = None  # cached has_work answer for (height, mempool version)
        self._work_key: tuple[int, int] = (-1, -1)
        self._no_value_key: tuple[int, int] = (-1, -1)
        self._last_scan = 0.0
        self._last_sync: dict[int, float] = {}
        self._stops: dict[int, set[int]] = {}
        self._stop_sent = -1
        self._stop_file = False
        self._evidence_posted: set[tuple[int, int, int, str]] = set()
        self._garbage_at = -1  # TEST ONLY: the height a "garbage" fault last sent at
        # the votes counted at the height committed last, by (round, step, voter)
        self._last_votes: dict[tuple[int, str, int], Vote] = {}
        self._live: set[int] = set(range(self.n))  # validators whose precommits we wait for
        self.machine = self._new_height()

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
        _, payload = bcast(self.comm, None, best,
                           b"".join(self.chain.lines_after(low)) if self.rank == best else b"")
        lines = payload.splitlines(keepends=True)
        mine = self.chain.height
        self._append_lines(lines[mine - low:])
        if mine < top:
            self.log(f"caught up from height {mine} to {top} (blocks from validator-{best})")

    def _append_lines(self, lines: list[bytes]) -> int:
        """Check and append committed blocks that extend our chain; return how many."""
        n = 0
        for line in lines:
            stored = StoredBlock.decode_line(line.rstrip(b"\n"))
            block = stored.block
            if block.height <= self.chain.height:
                continue
            if stored.hash != block.hash:
                raise InvalidBlock("catch-up block hash mismatch", height=block.height)
            check_certificate(self.validators, block, stored.certificate)
            try:  # records we hold are reused with their checked signatures
                decoded: list[SignedRecord] | None = self._decode(block)
            except Exception:  # noqa: BLE001 - check_block decodes it again and says why
                decoded = None
            self.state = check_block(self.state, block, height=self.chain.height + 1,
                                     prev=self.chain.head_hash, decoded=decoded)
            self.chain.append(block, stored.certificate)
            self.mempool.resolve([self._rid(r) for r in block.records])
            n += 1
        return n

    @staticmethod
    def _rid(record: dict[str, Any]) -> str:
        from .chain import record_id_of

        return record_id_of(record)

    # --- messages -----------------------------------------------------------------------------

    def _silent(self) -> bool:
        return (self.fault is not None and self.fault.behaviour == "silent"
                and self.fault.active(self.chain.height + 1))

    def _faulty(self, behaviour: str) -> bool:
        return (self.fault is not None and self.fault.behaviour == behaviour
                and self.fault.active(self.chain.height + 1))

    def send(self, msg: tuple[Any, ...], dest: int | None = None) -> None:
        if self._silent():
            return
        targets = range(self.size) if dest is None else (dest,)
        frame = wire.pack(msg)  # once, whatever the number of ranks
        for r in targets:
            if r != self.rank:
                self._sends.append(isend_bytes(self.comm, frame, r, _TAG_MSG))

    def _reap_sends(self) -> None:
        if self._sends:
            self._sends = [q for q in self._sends if not q.Test()]

    def _flush(self) -> None:
        """Send what the state machine wants sent (through the fault filter)."""
        out, self.machine.outbox = self.machine.outbox, []
        if out and self._faulty("garbage") and self._garbage_at != self.machine.height:
            self._garbage_at = self.machine.height
            for frame in garbage_frames(self.cfg.inbox, self.machine.height):
                for r in range(self.size):
                    if r != self.rank:
                        self._sends.append(isend_bytes(self.comm, frame, r, _TAG_MSG))
        for m in out:
            if isinstance(m, Proposal):
                self.send(("P", m.height, m.round, m.block.encode(), m.valid_round, m.index,
                           m.signature, m.block.record_lengths))
                continue
            if self._faulty("withhold"):
                continue
            if self._faulty("split-vote"):  # the vote to even ranks, another to odd ones
                other = NIL if m.block_hash != NIL else hashlib.sha256(b"split").hexdigest()
                w = sign_vote(self.identity, self.rank, m.step, m.height, m.round, other)
                for r, v in ((r, m if r % 2 == 0 else w) for r in range(self.size)):
                    self.send(("V", v.step, v.height, v.round, v.block_hash, v.index,
                               v.signature), dest=r)
                continue
            self.send(("V", m.step, m.height, m.round, m.block_hash, m.index, m.signature))
            if self._faulty("equivocate"):
                other = NIL if m.block_hash != NIL else hashlib.sha256(b"double").hexdigest()
                w = sign_vote(self.identity, self.rank, m.step, m.height, m.round, other)
                self.send(("V", w.step, w.height, w.round, w.block_hash, w.index, w.signature))
        self._post_evidence()

    def pump(self) -> bool:
        """Receive and handle every message waiting; True if there was any."""
        got = False
        status = MPI.Status()
        while self.comm.Iprobe(source=MPI.ANY_SOURCE, tag=_TAG_MSG, status=status):
            src = status.Get_source()
            frame = recv_bytes(self.comm, status, _TAG_MSG)
            got = True
            if self._silent():
                continue  # a silent validator ignores everything
            try:
                self.handle(src, wire.unpack(frame))
            except BAD_MESSAGE as exc:
                self.log(f"ignored a bad message from rank {src}: {describe(exc)}")
        return got

    def handle(self, src: int, msg: tuple[Any, ...]) -> None:
        kind = msg[0]
        if kind == "Q":
            if self.chain.height > int(msg[1]):
                self.send(("B", self.chain.lines_after(int(msg[1]), SYNC_BATCH)), dest=src)
            return
        if kind == "B":
            before = self.chain.height
            try:
                self._append_lines(list(msg[1]))
            finally:
                if self.chain.height > before:
                    self.log(f"caught up from height {before} to {self.chain.height} "
                             f"(blocks from validator-{src})")
                    self._next_height()
            return
        # The height the sender's chain has reached, and the message's own height.
        if kind == "S":
            their_chain, height = int(msg[1]), int(msg[1]) + 1
        else:
            height = int(msg[2] if kind == "V" else msg[1])
            their_chain = height - 1
        if their_chain > self.chain.height:
            self._note_ahead(src, their_chain)
        if height > self.machine.height:
            if height <= self.machine.height + 2:
                self._buffer_future(src, height, msg)
            return
        if height < self.machine.height:
            if kind == "V" and height == self.machine.height - 1:
                self._late_vote(msg)
            return  # an old height: the sender will ask us for blocks if it is behind
        self._dispatch(msg, src)

    def _late_vote(self, msg: tuple[Any, ...]) -> None:
        """A vote for the height we just committed counts for nothing any more, but it may
        still be the second half of a split vote (the first one, which we counted, is kept
        in `_last_votes`): then it is evidence all the same."""
        _, step, h, r, bh, idx, sig = msg
        v = Vote(str(step), int(h), int(r), str(bh), int(idx), str(sig))
        first = self._last_votes.get((v.round, v.step, v.index))
        if (first is None or first.height != v.height or first.block_hash == v.block_hash
                or not 0 <= v.index < self.n):
            return  # (after a catch-up by sync, the votes kept are of an older height)
        if (v.index, v.height, v.round, v.step) in self._evidence_posted:
            return
        if is_valid_signature(self.validators[v.index]["pubkey"], v.signed_bytes(),
                              v.signature):
            self._post_one(first, v)

    def _buffer_future(self, src: int, height: int, msg: tuple[Any, ...]) -> None:
        """Keep a message for one of the next two heights until we get there, within a
        budget per sender and height: FUTURE_PROPOSALS proposals (and as many stop notes),
        and FUTURE_VOTES_PER_VOTER votes of each validator (a relayed vote is charged to its
        voter, so a Byzantine voter cannot spend an honest relayer's budget). A Byzantine
        peer cannot make us keep an unbounded number of messages for heights we have not
        reached. What is dropped is not lost to liveness: if the others finalize without us,
        we fetch their blocks."""
        kind = msg[0]
        if kind == "V":
            voter = msg[5] if len(msg) == 7 else None
            if type(voter) is not int or not 0 <= voter < self.n:
                return
            key, cap = (height, src, voter), FUTURE_VOTES_PER_VOTER
        else:
            key, cap = (height, src, -1 if kind == "P" else -2), FUTURE_PROPOSALS
        count = self._future_count.get(key, 0)
        if count >= cap:
            return
        self._future_count[key] = count + 1
        self._future.setdefault(height, []).append((src, msg))

    def _dispatch(self, msg: tuple[Any, ...], src: int | None = None) -> None:
        now = time.monotonic()
        kind = msg[0]
        if kind == "P":
            _, h, r, raw, vr, idx, sig, lengths = msg
            block = self._parse_block(raw, lengths)
            self.machine.on_proposal(Proposal(int(h), int(r), block, int(vr), int(idx),
                                              str(sig)), now)
        elif kind == "V":
            _, step, h, r, bh, idx, sig = msg
            v = Vote(str(step), int(h), int(r), str(bh), int(idx), str(sig))
            if self.machine.on_vote(v, now) and v.index != self.rank \
                    and v.round <= self.machine.round + 1:
                self._relay(v, src)
        elif kind == "S" and src is not None:  # a rank says so for itself only
            self._stops.setdefault(int(msg[1]), set()).add(src)

    def _relay(self, v: Vote, src: int | None) -> None:
        """Pass a vote that was news to us on to every rank but its voter and the rank it
        came from. A Byzantine validator can send one vote to some peers and another to the
        rest; relayed, both reach every honest validator still at that height, which then
        holds the signed evidence. Receivers drop a vote they already have before checking
        its signature, so a relay costs one small message per rank and vote, never a
        verification. Only votes up to the next round are relayed (they still count here):
        a Byzantine voter cannot make us multiply votes for far-off rounds."""
        if self._silent():
            return
        frame = wire.pack(("V", v.step, v.height, v.round, v.block_hash, v.index,
                           v.signature))
        for r in range(self.size):
            if r not in (self.rank, v.index, src):
                self._sends.append(isend_bytes(self.comm, frame, r, _TAG_MSG))

    def _note_ahead(self, src: int, their_chain: int) -> None:
        """A peer has committed more than we have: ask it for blocks at once if it is two
        or more ahead, else if we have not caught up by ourselves after the commit timeout
        (normally we are just finishing the same height)."""
        now = time.monotonic()
        if self._ahead is None:
            self._ahead = (src, now)
        stale = now - self._ahead[1] > self.cfg.timeouts.commit + 0.1
        if (their_chain >= self.chain.height + 2 or stale) \
                and now - self._last_sync.get(src, 0.0) > 0.2:
            self._last_sync[src] = now
            self.send(("Q", self.chain.height), dest=src)

    def _post_evidence(self) -> None:
        for a, b in self.machine.evidence:
            self._post_one(a, b)

    def _post_one(self, a: Vote, b: Vote) -> None:
        """Post two signed, conflicting votes of one validator as evidence (once)."""
        key = (a.index, a.height, a.round, a.step)
        if key in self._evidence_posted:
            return
        self._evidence_posted.add(key)
        rec = sign_record(self.identity, EquivocationEvidence(
            self.validators[a.index]["name"], a.height, a.round, a.step, a.block_hash,
            a.signature, b.block_hash, b.signature))
        post(self.cfg.inbox, rec)
        self.log(f"equivocation by validator-{a.index} at height {a.height} round "
                 f"{a.round} ({a.step}): evidence {rec.record_id[:12]} posted")

    # --- what the state machine asks us -----------------------------------------------------

    def _scan(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last_scan >= self.cfg.interval:
            self._last_scan = now
            listings = self.mempool.listings
            with _collector_paused():
                self.mempool.refresh()  # one stat while nothing was posted or moved
            if self.mempool.listings != listings:
                self._stop_file = self._stop_path.exists()

    def prefetch(self, budget: float) -> bool:
        """Verify the signatures of pending records for up to `budget` seconds (while we would
        otherwise sleep), so checking them later in a block costs no verification. Returns
        whether there was anything to verify."""
        q = self.mempool.unverified
        if not q:
            return False
        end = time.monotonic() + budget
        entries = self.mempool.entries
        keys: dict[str, str | None] = {}  # signer -> its key (the state does not change here)
        while q and time.monotonic() < end:
            e = entries.get(q.popleft())
            if e is None:
                continue
            rec = e.record
            if rec.kind == "participant_joined":
                pub = rec.body.get("pubkey")
            else:
                try:
                    pub = keys[rec.signer]
                except KeyError:
                    pub = keys[rec.signer] = self.state.pubkey(rec.signer)
            if isinstance(pub, str):
                try:
                    record_signed_by(pub, rec)
                except Exception:  # noqa: BLE001,S112 - the real check will judge it
                    continue
        return True

    def _begun(self) -> EpochState:
        """A copy of the state with the next block begun (made at most once per height)."""
        if self._begun_state is None or self._begun_state.height != self.chain.height + 1:
            self._begun_state = self.state.copy()
            self._begun_state.begin_block(self.chain.height + 1, self.chain.head_hash)
        return self._begun_state

    def has_work(self) -> bool:
        """Whether a pending record passes the state's check for the next block (cached per
        height and mempool version). Final records are resolved, impossible ones rejected."""
        key = (self.chain.height, self.mempool.version)
        if key == self._work_key and self._work is not None:
            return self._work
        work = False
        for e in self.mempool.ordered():
            if self.state.has_applied(e.rid):
                self.mempool.resolve([e.rid])
                continue
            try:
                try:
                    self.state.check(e.record)  # cheap: no copy
                except InvalidRecord:
                    self._begun().check(e.record)  # the head block's hash known, as in a block
            except InvalidRecord as exc:
                if exc.permanent:
                    self.mempool.reject(e.rid, exc.reason)
                continue
            except Exception as exc:  # noqa: BLE001 - a record must never crash a validator
                self.mempool.reject(e.rid, f"{e.record.kind} record could not be checked: "
                                           f"{describe(exc)}")
                continue
            work = True
            break
        self._work, self._work_key = work, key
        return work

    def get_value(self, height: int, round_: int) -> Block | None:
        """A fresh block of the pending records valid on top of our state, or None."""
        with _collector_paused():
            return self._fresh_block(height, round_)

    def _fresh_block(self, height: int, round_: int) -> Block | None:
        key = (self.chain.height, self.mempool.version)
        if key == self._no_value_key:
            return None
        trial: EpochState | None = None
        accepted: list[SignedRecord] = []
        # Stop filling the block well before the others' propose timeout would fire.
        budget = self.cfg.timeouts.propose / 3
        until = time.monotonic() + budget
        for e in self.mempool.ordered():
            if self.state.has_applied(e.rid):
                self.mempool.resolve([e.rid])
                continue
            if trial is None:
                trial = self.state.copy()
                trial.begin_block(height, self.chain.head_hash)
                until = time.monotonic() + budget  # the copy is not the block's fault
            if trial.has_applied(e.rid):
                continue
            try:
                trial.apply(e.record)
            except InvalidRecord as exc:
                if exc.permanent:
                    self.mempool.reject(e.rid, exc.reason)
                continue  # not valid yet: stays pending
            except Exception as exc:  # noqa: BLE001 - a record must never crash the proposer
                self.mempool.reject(e.rid, f"{e.record.kind} record could not be checked: "
                                           f"{describe(exc)}")
                trial = None  # the failed check may have left marks: start again
                return self._fresh_block(height, round_)
            accepted.append(e.record)
            if len(accepted) >= self.cfg.max_block_records or time.monotonic() > until:
                break
        if not accepted or trial is None:
            self._no_value_key = key
            return None
        state_hash = trial.state_hash()
        if self._faulty("invalid-proposal"):
            state_hash = hashlib.sha256(b"not the state").hexdigest()
        block = Block.of_records(height, round_, self.chain.head_hash, self.name, accepted,
                                 state_hash)
        self._checked[block.hash] = trial if not self._faulty("invalid-proposal") else None
        self._rids[block.hash] = [r.record_id for r in accepted]
        return block

    def _parse_block(self, raw: bytes, lengths: Any) -> Block:
        """A proposed block from its bytes: cut at the proposer's record lengths when they
        fit (records we hold are recognized by their ids, nothing is parsed twice), else
        parsed whole. Either way the block is exactly the one the bytes encode."""
        entries = self.mempool.entries

        def known(rid: str) -> SignedRecord | None:
            e = entries.get(rid)
            return e.record if e is not None else None

        parsed = Block.from_parts(raw, lengths, known)
        if parsed is None:
            return Block.from_canonical(raw)
        block, records, rids = parsed
        self._decoded[block.hash] = records
        self._rids[block.hash] = rids
        return block

    def _decode(self, block: Block) -> list[SignedRecord]:
        """The block's records, decoded once: a record we hold in the mempool (same record
        id, so the same canonical bytes) is reused with its checked signature."""
        out, rids = [], []
        for d in block.records:
            try:
                rid = sha256_hex(dumps_canonical(d))  # the block's bytes are canonical
            except (TypeError, ValueError):
                rid = ""
            e = self.mempool.entries.get(rid) if rid else None
            rec = e.record if e is not None else SignedRecord.from_dict(d)
            out.append(rec)
            rids.append(rec.record_id)
        self._rids[block.hash] = rids
        return out

    def valid(self, block: Block) -> bool:
        """check_block against our state, once per block hash."""
        h = block.hash
        if h not in self._checked:
            try:
                decoded = self._decoded.get(h)
                with _collector_paused():
                    self._checked[h] = check_block(
                        self.state, block, height=self.chain.height + 1,
                        prev=self.chain.head_hash,
                        decoded=decoded if decoded is not None else self._decode(block))
            except Exception as exc:  # noqa: BLE001 - an invalid block is a nil vote
                reason = exc.reason if isinstance(exc, InvalidBlock) else describe(exc)
                self.log(f"invalid block {h[:12]} at height {block.height}: {reason}")
                self._checked[h] = None
        return self._checked[h] is not None

    # --- heights ----------------------------------------------------------------------------

    def _new_height(self) -> Height:
        self._checked = {}
        self._rids = {}
        self._decoded = {}
        return Height(self.validators, self.rank, self.identity, self.chain.height + 1,
                      self.cfg.timeouts, self.get_value, self.valid, self.has_work)

    def _next_height(self) -> None:
        self._ahead = None
        self.machine = self._new_height()
        if self.fault is not None and self.fault.behaviour == "raise" \
                and self.machine.height == self.fault.from_height:
            raise RuntimeError(f"fault injection: validator-{self.rank} raises at height "
                               f"{self.machine.height}")
        self.machine.start(time.monotonic())
        self._future = {h: m for h, m in self._future.items() if h >= self.machine.height}
        self._future_count = {k: c for k, c in self._future_count.items()
                              if k[0] > self.machine.height}
        for src, msg in self._future.pop(self.machine.height, []):
            try:
                self._dispatch(msg, src)
            except BAD_MESSAGE as exc:
                self.log(f"ignored a bad message from rank {src}: {describe(exc)}")

    def _commit(self) -> None:
        assert self.machine.decision is not None
        block, round_ = self.machine.decision
        new_state = self._checked.get(block.hash)
        if new_state is None:
            raise InvalidBlock("a block this validator judged invalid was committed by a "
                               "quorum; its state diverged", height=block.height)
        cert = self.machine.certificate()
        self.chain.append(block, cert)
        self._last_votes = {(r, st, i): v for (r, st), t in self.machine.tallies.items()
                            for i, v in t.votes.items()}
        self.state = new_state
        self._live = self.machine.precommitted() | {self.rank}
        rids = self._rids.get(block.hash) or [self._rid(r) for r in block.records]
        self.mempool.resolve(rids)
        self.write_head()
        self.log(f"committed height {block.height}: {len(block.records)} records, round "
                 f"{round_}, {len(cert)}/{self.n} votes, hash {block.hash[:12]}")

    def write_head(self) -> None:
        if self.rank == 0:
            atomic_write_bytes(self.cfg.data / "head.json", json.dumps(
                {"height": self.chain.height, "hash": self.chain.head_hash}).encode() + b"\n")

    # --- the loop ---------------------------------------------------------------------------

    def run(self) -> None:
        self.catch_up()
        self.write_head()
        self.log(f"ready at height {self.chain.height} ({self.n} validators)")
        self._scan(force=True)
        self._next_height()
        decided_at: float | None = None
        idle = 0  # loops in a row with nothing to do: the sleep grows, up to IDLE_POLL_S
        while True:
            busy = self.pump()
            self._reap_sends()
            if self._silent():
                time.sleep(POLL_S * 4)
                continue
            self._flush()
            now = time.monotonic()
            m = self.machine
            if self._ahead is not None:
                self._note_ahead(self._ahead[0], self.chain.height + 1)
            if m.decision is None:
                self._scan()
                m.tick(now)
                self._flush()
            if m.decision is not None:
                decided_at = decided_at or now
                block, r = m.decision
                waiting = self._live - m.precommitted()
                if not waiting or now - decided_at >= self.cfg.timeouts.commit:
                    self._commit()
                    decided_at = None
                    self._next_height()
                    self._flush()
                    # What survives a height (the state, pending records) lives on: keep the
                    # collector from walking it again and again (about 5% of the CPU).
                    gc.freeze()
                    continue
            elif self._ready_to_stop():
                return
            if busy or self.prefetch(0.005):
                idle = 0
            else:
                # Polling costs CPU the busy ranks need (4 ranks on 2 cores spend a quarter
                # of a core polling every 0.5 ms): back off while idle, but keep polling fast
                # while our own sends are in flight (MPI moves big messages only when polled).
                idle += 1
                time.sleep(POLL_S if self._sends else min(POLL_S * (1 + idle // 8), IDLE_POLL_S))

    def _ready_to_stop(self) -> bool:
        m = self.machine
        if not self._stop_file or m.proposals or m.step != "propose" or self.has_work():
            return False
        h = self.chain.height
        if self._stop_sent != h:
            self._stop_sent = h
            self.send(("S", h, self.rank))
        stops = self._stops.setdefault(h, set())
        stops.add(self.rank)
        if len(stops) < self.n:
            return False
        if not _wait_sends(self._sends, timeout=5.0):
            self.log("some messages were never received by their rank")
        self.log(f"stopping at height {h}")
        return True


def run(cfg: RunConfig) -> int:
    """Entry point of one rank. Any error aborts the whole job so no rank waits forever."""
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    # MPI_Init is behind us (mpi4py ran it at import): slurm/gonka_validators.sh watches for
    # this line to tell a start-up that hangs in MPICH's exchange from a slow catch-up
    sys.stderr.write(f"[validator-{rank}] MPI started: {comm.Get_size()} ranks\n")
    sys.stderr.flush()
    try:
        genesis = load_genesis_file(Path(cfg.genesis_path))  # a clear error, not a traceback
        validators = genesis.get("validators")
        if not isinstance(validators, list) or not validators:
            raise GonkaError(f"{cfg.genesis_path}: field 'validators': not a non-empty list")
        n = len(validators)
        size = comm.Get_size()
        if size != n or (cfg.expect_size is not None and size != cfg.expect_size):
            raise GonkaError(
                f"MPI world has {size} ranks but genesis has {n} validators"
                + (f" and --expect-size is {cfg.expect_size}" if cfg.expect_size else "")
                + ": start one rank per validator (mpiexec -n N, or srun --mpi=pmi2 -n N); a "
                "wrong launcher starts N single-rank worlds")
        faults = load_faults(cfg.fault_injection)
        if rank in faults:
            sys.stderr.write(f"[validator-{rank}] TEST-ONLY fault injection: "
                             f"{faults[rank].behaviour}\n")
        Validator(comm, cfg, genesis, faults).run()
    except BaseException as exc:  # noqa: BLE001 - the boundary of a rank: abort everyone
        if isinstance(exc, GonkaError):
            sys.stderr.write(f"[validator-{rank}] ERROR {exc}\n")
        else:
            sys.stderr.write(f"[validator-{rank}] " + traceback.format_exc())
        sys.stderr.flush()
        time.sleep(0.2)  # let mpiexec forward the message before the abort kills the job
        comm.Abort(1)
    return 0
