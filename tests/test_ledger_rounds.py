"""The Tendermint round rules (ledger/rounds.py) and the weighted proposer, in one process.

n `Height` state machines exchange their real signed messages through a simulated network
that can hold chosen messages back (delivered later by `heal`, as partial synchrony allows),
on a simulated clock (timeouts fire when the test advances it).
Blocks are judged valid by a stand-in check (a block is invalid iff its state_hash is "bad"),
so these tests isolate the rules: agreement, locking and re-proposal, timeouts and round
changes, equivocation evidence, and the certificate a decision produces.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from gonka_hpc.canonical import canonical_hash
from ledger.block import Block, check_certificate
from ledger.proposer import proposer_cycle, proposer_index
from ledger.rounds import Height, Proposal, Timeouts, Vote, sign_vote
from ledger.testkit import World
from ledger.votes import NIL, PREVOTE

Msg = Proposal | Vote
Drop = Callable[[int, int, Msg], bool]


class SimNet:
    """n validators at height 1, all messages delivered in order unless `hold` says later."""

    def __init__(self, n: int = 4, weights: list[int] | None = None,
                 bad_proposers: tuple[int, ...] = (), silent: tuple[int, ...] = ()) -> None:
        self.world = World(n_validators=n)
        self.vals: list[dict[str, Any]] = [dict(v) for v in self.world.genesis["validators"]]
        for v, wt in zip(self.vals, weights or [1] * n):
            v["weight"] = wt
        self.prev = canonical_hash(self.world.genesis)
        self.now = 0.0
        self.silent = set(silent)
        self.hold: Drop = lambda src, dst, m: False
        self.held: list[tuple[int, Msg]] = []
        self.machines = [
            Height(self.vals, i, self.world.identity(v["name"]), 1, Timeouts(),
                   self._value_of(i, i in bad_proposers), self._valid, lambda: True)
            for i, v in enumerate(self.vals)]
        for m in self.machines:
            m.start(self.now)

    def _value_of(self, i: int, bad: bool) -> Callable[[int, int], Block]:
        def get_value(height: int, round_: int) -> Block:
            return Block(height, round_, self.prev, self.vals[i]["name"], (),
                         "bad" if bad else f"by-{i}-in-{round_}")
        return get_value

    @staticmethod
    def _valid(block: Block) -> bool:
        return block.state_hash != "bad"

    def deliver(self) -> int:
        """Deliver every queued message once; return how many were delivered."""
        moved = 0
        for src, m in enumerate(self.machines):
            out, m.outbox = m.outbox, []
            if src in self.silent:
                continue
            for msg in out:
                for dst in range(len(self.machines)):
                    if dst == src or dst in self.silent:
                        continue
                    if self.hold(src, dst, msg):
                        self.held.append((dst, msg))
                        continue
                    moved += 1
                    self._to(dst, msg)
        return moved

    def _to(self, dst: int, msg: Msg) -> None:
        if isinstance(msg, Proposal):
            self.machines[dst].on_proposal(msg, self.now)
        else:
            self.machines[dst].on_vote(msg, self.now)

    def heal(self) -> None:
        """Stop holding messages back; deliver the ones held so far."""
        self.hold = lambda src, dst, m: False
        held, self.held = self.held, []
        for dst, msg in held:
            self._to(dst, msg)

    def run(self, until: Callable[[], bool], max_seconds: float = 60.0) -> None:
        while not until():
            if self.deliver():
                continue
            if self.now > max_seconds:
                raise AssertionError("no progress")
            self.now += 0.05
            for m in self.machines:
                m.tick(self.now)

    def honest(self) -> list[Height]:
        return [m for i, m in enumerate(self.machines) if i not in self.silent]

    def all_decided(self) -> bool:
        return all(m.decision is not None for m in self.honest())


def test_equal_weights_rotate_and_weights_set_the_share() -> None:
    vals = [{"weight": 1}] * 4
    assert [proposer_index(vals, h, 0) for h in range(1, 9)] == [1, 2, 3, 0, 1, 2, 3, 0]
    assert proposer_index(vals, 5, 2) == proposer_index(vals, 6, 1) == 3
    weighted = [{"weight": 10}, {"weight": 20}, {"weight": 30}]
    cycle = proposer_cycle(weighted)
    assert len(cycle) == 6 and Counter(cycle) == {0: 1, 1: 2, 2: 3}
    assert all(cycle[i] != cycle[i + 1] or cycle[i] == 2 for i in range(5))  # spread out
    with pytest.raises(ValueError):
        proposer_cycle([{"weight": 0}])


def test_honest_validators_decide_one_block_in_round_0() -> None:
    net = SimNet(4)
    net.run(net.all_decided)
    decided = {m.decision[0].hash for m in net.machines if m.decision}
    assert len(decided) == 1
    block, r = net.machines[0].decision  # type: ignore[misc]
    assert r == 0 and block.proposer == "validator-1"  # proposer of (1, 0)
    net.deliver()  # the last precommits in flight
    cert = net.machines[2].certificate()
    assert [c["index"] for c in cert] == [0, 1, 2, 3]
    check_certificate(net.vals, block, cert)


def test_a_silent_proposer_costs_one_round() -> None:
    net = SimNet(4, silent=(1,))  # validator-1 proposes (1, 0)
    net.run(net.all_decided)
    blocks = {m.decision[0].hash: m.decision for m in net.honest() if m.decision}
    assert len(blocks) == 1
    (block, r), = blocks.values()
    assert r == 1 and block.round == 1 and block.proposer == "validator-2"
    assert net.now >= Timeouts().propose  # only the propose timeout moved it on


def test_an_invalid_proposal_gets_nil_votes_and_the_next_round_decides() -> None:
    net = SimNet(4, bad_proposers=(1,))
    net.run(net.all_decided)
    for m in net.machines:
        assert m.decision is not None and m.decision[1] == 1
        t = m.tallies[(0, PREVOTE)]
        assert t.weight.get(NIL, 0) >= 3  # every honest validator prevoted nil in round 0


def test_a_weighted_majority_decides_alone() -> None:
    # validator-0 holds 5 of 8: with validator-3 (weight 1) it has 6 > 16/3.
    net = SimNet(4, weights=[5, 1, 1, 1], silent=(1, 2))
    net.run(net.all_decided)
    block, _ = net.machines[0].decision  # type: ignore[misc]
    assert net.machines[3].decision is not None
    assert net.machines[3].decision[0].hash == block.hash


def _round0(m: Msg) -> bool:
    return m.round == 0


def test_a_locked_block_is_reproposed_and_decided_in_a_later_round() -> None:
    """Round 0: validator-3 never gets the proposal B (prevotes nil after its timeout) and
    validator-0's prevote for B reaches validator-1 only late. So validator-0 and -2 see 2/3
    prevotes for B and lock on it, -1 and -3 do not, and the precommits split 2/2: no
    decision. Round 1's proposer, validator-2, re-proposes its valid value B with valid round
    0; B is decided in round 1, so its certificate names round 1."""
    net = SimNet(4)
    net.hold = lambda src, dst, m: _round0(m) and (
        isinstance(m, Proposal) and dst == 3
        or isinstance(m, Vote) and m.step == PREVOTE and src == 0 and dst == 1)
    net.run(lambda: all(m.round == 1 for m in net.machines))
    b = net.machines[0].locked
    assert b is not None and net.machines[2].locked is not None
    assert net.machines[2].locked.hash == b.hash and net.machines[1].locked is None
    assert not any(m.decision for m in net.machines)
    net.heal()
    net.run(net.all_decided)
    p1 = net.machines[3].proposals[1]
    assert p1.valid_round == 0 and p1.block.hash == b.hash
    for m in net.machines:
        assert m.decision is not None and m.decision[0].hash == b.hash and m.decision[1] == 1
    net.deliver()
    cert = net.machines[1].certificate()
    assert len(cert) == 4 and all(c["round"] == 1 for c in cert)
    check_certificate(net.vals, b, cert)


def test_a_locked_validator_prevotes_nil_until_a_newer_polka() -> None:
    """As above, but validator-2 also misses validator-0's prevote: only validator-0 locks on
    B. Round 1's proposer (validator-2) proposes a fresh B'; validator-0 prevotes nil (its
    lock), the other three prevote B', and that newer 2/3 moves validator-0's lock: B' is
    decided in round 1."""
    net = SimNet(4)
    net.hold = lambda src, dst, m: _round0(m) and (
        isinstance(m, Proposal) and dst == 3
        or isinstance(m, Vote) and m.step == PREVOTE and src == 0 and dst in (1, 2))
    net.run(lambda: all(m.round == 1 for m in net.machines))
    b = net.machines[0].locked
    assert b is not None and all(m.locked is None for m in net.machines[1:])
    net.heal()
    net.run(net.all_decided)
    m0 = net.machines[0]
    assert m0.tallies[(1, PREVOTE)].votes[0].block_hash == NIL
    decided = {m.decision[0].hash for m in net.machines if m.decision}
    assert len(decided) == 1 and b.hash not in decided
    assert m0.locked is not None and m0.locked_round == 1 and m0.locked.hash in decided


def test_a_locked_validator_prevotes_nil_for_a_different_fresh_block() -> None:
    net = SimNet(4)
    m = net.machines[0]
    other = Block(1, 0, net.prev, "validator-1", (), "locked")
    m.locked, m.locked_round = other, 0
    net.run(lambda: (0, PREVOTE) in m.tallies and 0 in m.tallies[(0, PREVOTE)].votes)
    assert m.tallies[(0, PREVOTE)].votes[0].block_hash == NIL


def test_a_double_vote_is_not_counted_and_becomes_evidence() -> None:
    net = SimNet(4)
    m = net.machines[0]
    ident = net.world.identity("validator-3")
    a = sign_vote(ident, 3, PREVOTE, 1, 0, "aa" * 32)
    b = sign_vote(ident, 3, PREVOTE, 1, 0, NIL)
    # on_vote says which votes are news: those the driver relays to the other validators.
    assert m.on_vote(a, 0.0) is True
    assert m.on_vote(a, 0.0) is False  # a duplicate is no offence, and not news
    assert m.on_vote(b, 0.0) is True  # the conflicting vote: relayed, so every peer sees it
    assert m.evidence == [(a, b)]
    assert m.tallies[(0, PREVOTE)].weight == {"aa" * 32: 1}
    # Either half again, or a third value, adds nothing: one piece of evidence per offence.
    c = sign_vote(ident, 3, PREVOTE, 1, 0, "cc" * 32)
    assert [m.on_vote(x, 0.0) for x in (a, b, c)] == [False, False, False]
    assert m.evidence == [(a, b)]
    forged = Vote(PREVOTE, 1, 0, "bb" * 32, 2, b.signature)  # not validator-2's signature
    assert m.on_vote(forged, 0.0) is False
    assert 2 not in m.tallies[(0, PREVOTE)].votes


def test_messages_from_a_later_round_move_a_lagging_validator_on() -> None:
    net = SimNet(4)
    m = net.machines[0]
    for i in (1, 2):  # 2 of 4 > 1/3 of the weight are in round 3
        m.on_vote(sign_vote(net.world.identity(f"validator-{i}"), i, PREVOTE, 1, 3, NIL), 0.0)
    assert m.round == 3
