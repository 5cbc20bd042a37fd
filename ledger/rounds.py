"""One height of Tendermint consensus, as a pure state machine (no MPI, no disk, no clock).

The rules are those of "The latest gossip on BFT consensus" (Buchman, Kwon, Milosevic 2018,
Algorithm 1), with weights: "2f+1" is more than 2/3 of the validators' weight, "f+1" more
than 1/3.

- round r starts: the proposer of (height, r) (`ledger.proposer`) proposes its valid value
  (the block it saw 2/3 prevote for) if it has one, else a fresh block (`get_value`; None
  means nothing to propose yet: it asks again on every `tick`).
- propose step: on the round's proposal, prevote it if it is valid and not in conflict with
  our lock (a re-proposal with valid round vr needs 2/3 prevotes at vr), else prevote nil.
  `timeout_propose(r)` prevotes nil; it runs only while there is work (`has_work`: records
  waiting) or a peer is active in the round, so an idle network does not churn rounds.
- 2/3 prevotes for the proposal: lock on it, precommit it, remember it as the valid value.
  2/3 prevotes for nil: precommit nil. 2/3 prevotes of any kind: `timeout_prevote(r)` then
  precommit nil.
- 2/3 precommits of any kind: `timeout_precommit(r)`, then round r + 1. 2/3 precommits for a
  valid block in any round of the height: decided.
- f+1 weight of messages from a later round: skip to it.
Timeouts grow linearly with the round (`Timeouts`).

Every vote and proposal is signed (`ledger.votes`) and checked here; a validator's second,
different vote for the same (round, step) is not counted and becomes equivocation evidence
(both signed votes). `valid(block)` is the caller's check of a block against its state.
The driver (`ledger.consensus`) feeds messages in, calls `tick(now)`, and sends `outbox`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from gonka_hpc.identity import Identity, is_valid_signature

from .block import Block
from .proposer import proposer_index
from .votes import NIL, PRECOMMIT, PREVOTE, proposal_bytes, vote_bytes

PROPOSE = "propose"


@dataclass(frozen=True)
class Timeouts:
    """Round timeouts in seconds: base + round × delta."""

    propose: float = 1.0
    propose_delta: float = 0.5
    vote: float = 0.5  # prevote and precommit
    vote_delta: float = 0.25
    commit: float = 0.5  # how long a decided height waits for late precommits

    def scaled(self, factor: float) -> Timeouts:
        return Timeouts(*(x * factor for x in (self.propose, self.propose_delta, self.vote,
                                               self.vote_delta, self.commit)))


@dataclass(frozen=True)
class Vote:
    """A signed prevote or precommit; block_hash NIL is a nil vote."""

    step: str
    height: int
    round: int
    block_hash: str
    index: int  # the voter's genesis index
    signature: str

    def signed_bytes(self) -> bytes:
        return vote_bytes(self.step, self.height, self.round, self.block_hash)


@dataclass(frozen=True)
class Proposal:
    """A signed proposal of `block` in (height, round); valid_round -1 for a fresh block."""

    height: int
    round: int
    block: Block
    valid_round: int
    index: int
    signature: str

    def signed_bytes(self) -> bytes:
        return proposal_bytes(self.height, self.round, self.block.hash, self.valid_round)


def sign_vote(identity: Identity, index: int, step: str, height: int, round_: int,
              block_hash: str) -> Vote:
    return Vote(step, height, round_, block_hash, index,
                identity.sign(vote_bytes(step, height, round_, block_hash)))


def sign_proposal(identity: Identity, index: int, block: Block, round_: int,
                  valid_round: int) -> Proposal:
    return Proposal(block.height, round_, block, valid_round, index,
                    identity.sign(proposal_bytes(block.height, round_, block.hash,
                                                 valid_round)))


@dataclass
class _Tally:
    """The first vote of each validator for one (round, step), and their weight by value."""

    votes: dict[int, Vote] = field(default_factory=dict)
    weight: dict[str, int] = field(default_factory=dict)  # block_hash (NIL too) -> weight
    total: int = 0


class Height:
    """The consensus state of one validator at one height. See the module docstring."""

    def __init__(self, validators: Sequence[Mapping[str, Any]], me: int, identity: Identity,
                 height: int, timeouts: Timeouts,
                 get_value: Callable[[int, int], Block | None],
                 valid: Callable[[Block], bool], has_work: Callable[[], bool]) -> None:
        self.validators = validators
        self.weights = [int(v["weight"]) for v in validators]
        self.total = sum(self.weights)
        self.me, self.identity, self.height, self.timeouts = me, identity, height, timeouts
        self._get_value, self._valid, self._has_work = get_value, valid, has_work
        self.round = 0
        self.step = PROPOSE
        self.locked: Block | None = None
        self.locked_round = -1
        self.valid_value: Block | None = None
        self.valid_round = -1
        self.proposals: dict[int, Proposal] = {}  # round -> the proposer's first proposal
        self.blocks: dict[str, Block] = {}  # hash -> block, from any proposal of this height
        self.tallies: dict[tuple[int, str], _Tally] = {}
        self.senders: dict[int, set[int]] = {}  # round -> validators heard from in it
        self.timers: dict[str, tuple[float, int]] = {}  # step -> (deadline, round)
        self.outbox: list[Proposal | Vote] = []
        self.evidence: list[tuple[Vote, Vote]] = []
        self.decision: tuple[Block, int] | None = None  # (block, round of its precommits)
        self._done: set[tuple[str, int]] = set()  # one-shot rules already fired, by round
        self._waiting_value = False
        self._proposers: dict[int, int] = {}  # round -> proposer index
        self.now = 0.0

    # --- helpers ------------------------------------------------------------------------------

    def proposer(self, round_: int) -> int:
        p = self._proposers.get(round_)  # asked on every tick: worked out once per round
        if p is None:
            p = self._proposers[round_] = proposer_index(self.validators, self.height, round_)
        return p

    def _quorum(self, weight: int) -> bool:
        return 3 * weight > 2 * self.total

    def _tally(self, round_: int, step: str) -> _Tally:
        return self.tallies.setdefault((round_, step), _Tally())

    def _broadcast(self, msg: Proposal | Vote) -> None:
        self.outbox.append(msg)
        if isinstance(msg, Vote):
            self._count(msg)
        else:
            self._store_proposal(msg)

    def _vote(self, step: str, block_hash: str) -> None:
        self._broadcast(sign_vote(self.identity, self.me, step, self.height, self.round,
                                  block_hash))

    def _schedule(self, step: str, seconds: float) -> None:
        if step not in self.timers or self.timers[step][1] != self.round:
            self.timers[step] = (self.now + seconds, self.round)

    def _valid_block(self, block: Block) -> bool:
        return self._valid(block)

    # --- input --------------------------------------------------------------------------------

    def start(self, now: float) -> None:
        self.now = now
        self._start_round(0)
        self._evaluate()

    def on_proposal(self, p: Proposal, now: float) -> None:
        self.now = now
        if p.height != self.height or self.decision is not None:
            return
        if not 0 <= p.index < len(self.validators) or p.index != self.proposer(p.round):
            return
        if not -1 <= p.valid_round < p.round or p.block.height != self.height:
            return
        if p.valid_round == -1 and p.block.round != p.round:
            return  # a fresh block names the round it is proposed in
        if p.round in self.proposals:
            return  # the first proposal of a round counts (a second one is ignored)
        if not is_valid_signature(self.validators[p.index]["pubkey"], p.signed_bytes(),
                                  p.signature):
            return
        self._store_proposal(p)
        self._evaluate()

    def on_vote(self, v: Vote, now: float) -> bool:
        """Take a vote in. Returns True when it is news: a validly signed vote not seen
        before, counted or (a second value for the same round and step) kept as evidence.
        The driver relays news to the other validators, so a validator that sends different
        votes to different peers is caught by every honest one that hears both."""
        self.now = now
        if v.height != self.height or v.step not in (PREVOTE, PRECOMMIT) or v.round < 0:
            return False
        if not 0 <= v.index < len(self.validators):
            return False
        tally = self.tallies.get((v.round, v.step))
        first = tally.votes.get(v.index) if tally else None
        if first is not None and first.block_hash == v.block_hash:
            return False  # a duplicate
        if first is not None and any(a.index == v.index and a.round == v.round
                                     and a.step == v.step for a, _ in self.evidence):
            return False  # this offence is on record already: one piece of evidence each
        if not is_valid_signature(self.validators[v.index]["pubkey"], v.signed_bytes(),
                                  v.signature):
            return False
        if first is not None:
            self.evidence.append((first, v))  # two signed votes, different values
            return True
        self._count(v)
        self._evaluate()
        return True

    def tick(self, now: float) -> None:
        """Fire due timeouts; start the propose timeout when there is work; ask for a value
        again if we propose and had nothing."""
        self.now = now
        if self.decision is not None:
            return
        if self.step == PROPOSE:
            if self._waiting_value and self.proposer(self.round) == self.me:
                self._propose()
            elif (self.proposer(self.round) != self.me and PROPOSE not in self.timers
                  and (self.senders.get(self.round) or self._has_work())):
                self._schedule(PROPOSE, self.timeouts.propose
                               + self.round * self.timeouts.propose_delta)
        for step, (deadline, round_) in list(self.timers.items()):
            if now >= deadline:
                del self.timers[step]
                self._timeout(step, round_)
        self._evaluate()

    # --- the rules ------------------------------------------------------------------------------

    def _store_proposal(self, p: Proposal) -> None:
        self.proposals.setdefault(p.round, p)
        self.blocks.setdefault(p.block.hash, p.block)
        self.senders.setdefault(p.round, set()).add(p.index)

    def _count(self, v: Vote) -> None:
        tally = self._tally(v.round, v.step)
        if v.index in tally.votes:
            return
        tally.votes[v.index] = v
        w = self.weights[v.index]
        tally.weight[v.block_hash] = tally.weight.get(v.block_hash, 0) + w
        tally.total += w
        self.senders.setdefault(v.round, set()).add(v.index)

    def _start_round(self, round_: int) -> None:
        self.round = round_
        self.step = PROPOSE
        self.timers = {k: t for k, t in self.timers.items() if t[1] >= round_}
        self.timers.pop(PROPOSE, None)
        self._waiting_value = False
        if self.proposer(round_) == self.me:
            self._propose()

    def _propose(self) -> None:
        block, vr = self.valid_value, self.valid_round
        if block is None:
            block, vr = self._get_value(self.height, self.round), -1
        if block is None:
            self._waiting_value = True
            return
        self._waiting_value = False
        self._broadcast(sign_proposal(self.identity, self.me, block, self.round, vr))

    def _timeout(self, step: str, round_: int) -> None:
        if round_ != self.round:
            return
        if step == PROPOSE and self.step == PROPOSE:
            self._vote(PREVOTE, NIL)
            self.step = PREVOTE
        elif step == PREVOTE and self.step == PREVOTE:
            self._vote(PRECOMMIT, NIL)
            self.step = PRECOMMIT
        elif step == PRECOMMIT and self.decision is None:
            self._start_round(round_ + 1)

    def _fire_once(self, rule: str, round_: int) -> bool:
        if (rule, round_) in self._done:
            return False
        self._done.add((rule, round_))
        return True

    def _evaluate(self) -> None:
        """Apply every rule whose condition holds, until none does."""
        changed = True
        while changed and self.decision is None:
            changed = self._step_rules()

    def _step_rules(self) -> bool:
        r = self.round
        prop = self.proposals.get(r)
        prevotes = self._tally(r, PREVOTE)
        # Decide: 2/3 precommits for a known, valid block in any round of this height.
        for (rr, step), tally in self.tallies.items():
            if step != PRECOMMIT:
                continue
            for h, w in tally.weight.items():
                if h != NIL and self._quorum(w) and h in self.blocks \
                        and self._valid_block(self.blocks[h]):
                    self.decision = (self.blocks[h], rr)
                    self.timers.clear()
                    return False
        # Propose step: prevote the round's proposal (or nil).
        if self.step == PROPOSE and prop is not None:
            v = prop.block
            vr = prop.valid_round
            if vr == -1:
                ok = self._valid_block(v) and (self.locked_round == -1
                                               or self.locked is not None
                                               and self.locked.hash == v.hash)
                self._vote(PREVOTE, v.hash if ok else NIL)
                self.step = PREVOTE
                return True
            if self._quorum(self._tally(vr, PREVOTE).weight.get(v.hash, 0)):
                ok = self._valid_block(v) and (self.locked_round <= vr
                                               or self.locked is not None
                                               and self.locked.hash == v.hash)
                self._vote(PREVOTE, v.hash if ok else NIL)
                self.step = PREVOTE
                return True
        if self.step == PREVOTE and self._quorum(prevotes.total) \
                and self._fire_once("prevote-timeout", r):
            self._schedule(PREVOTE, self.timeouts.vote + r * self.timeouts.vote_delta)
        if prop is not None and self.step in (PREVOTE, PRECOMMIT) \
                and self._quorum(prevotes.weight.get(prop.block.hash, 0)) \
                and self._valid_block(prop.block) and self._fire_once("lock", r):
            if self.step == PREVOTE:
                self.locked, self.locked_round = prop.block, r
                self._vote(PRECOMMIT, prop.block.hash)
                self.step = PRECOMMIT
            self.valid_value, self.valid_round = prop.block, r
            return True
        if self.step == PREVOTE and self._quorum(prevotes.weight.get(NIL, 0)):
            self._vote(PRECOMMIT, NIL)
            self.step = PRECOMMIT
            return True
        if self._quorum(self._tally(r, PRECOMMIT).total) and self._fire_once("precommit-timeout",
                                                                              r):
            self._schedule(PRECOMMIT, self.timeouts.vote + r * self.timeouts.vote_delta)
        # Skip ahead: f+1 weight heard from a later round.
        for rr, who in sorted(self.senders.items()):
            if rr > r and 3 * sum(self.weights[i] for i in who) > self.total:
                self._start_round(rr)
                return True
        return False

    # --- the certificate ------------------------------------------------------------------------

    def certificate(self) -> list[dict[str, Any]]:
        """The precommits for the decided block, in the form chain.log stores."""
        assert self.decision is not None
        block, r = self.decision
        tally = self._tally(r, PRECOMMIT)
        out = []
        for i in sorted(tally.votes):
            v = tally.votes[i]
            if v.block_hash == block.hash:
                vote: dict[str, Any] = {"index": i, "validator": self.validators[i]["name"],
                                        "signature": v.signature}
                if r != block.round:
                    vote["round"] = r
                out.append(vote)
        return out

    def precommitted(self) -> set[int]:
        """Validators whose precommit for the decided block we hold."""
        assert self.decision is not None
        block, r = self.decision
        return {i for i, v in self._tally(r, PRECOMMIT).votes.items()
                if v.block_hash == block.hash}
