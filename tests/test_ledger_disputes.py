"""Disputes in the epoch state machine (ledger/state.py) and the panel re-check (verify/dispute.py).

A failing verdict opens a dispute; the panel is drawn from the hash of the block holding the
verdict; only panel members vote, once each, on open disputes, with well-formed evidence; more
than 2/3 of the panel's weight decides. Every rejection is checked to leave the state (hash and
money) untouched. Settlement outcomes are computed by hand, and a seeded random test compares
the settlement against an independent re-implementation of the 2/3 rule. The last tests run the
real re-check on the local model and replay a dispute through a signed chain.
"""

from __future__ import annotations

import dataclasses
import random
import re
from pathlib import Path

import numpy as np
import pytest

from gonka_hpc.canonical import canonical_hash
from gonka_hpc.errors import GonkaError
from gonka_hpc.randomness import choose_panel
from gonka_hpc.records import DisputeVote, SignedRecord, evidence_digest, sign_record
from ledger.state import EpochState, InvalidRecord, replay
from ledger.testkit import World

# --- helpers ---------------------------------------------------------------------------------

WEIGHTS = {"ta": 10, "exec-a": 10, "exec-b": 20, "v1": 5, "v2": 15, "v3": 30}


def rejects(state: EpochState, rec: SignedRecord, pattern: str, *,
            permanent: bool | None = None) -> InvalidRecord:
    """Assert `rec` is rejected with a reason matching `pattern` and the state is untouched."""
    before_hash, before_supply = state.state_hash(), state.total_supply()
    with pytest.raises(InvalidRecord) as info:
        state.apply(rec)
    assert re.search(pattern, info.value.reason), info.value.reason
    if permanent is not None:
        assert info.value.permanent is permanent, info.value.reason
    assert state.state_hash() == before_hash
    assert state.total_supply() == before_supply
    return info.value


def _resign(world: World, rec: SignedRecord, **changes: object) -> SignedRecord:
    """The same vote with some body fields changed, signed again by its signer."""
    body = dataclasses.replace(rec.typed_body(), **changes)
    return sign_record(world.identity(rec.signer), body)


@pytest.fixture
def world() -> World:
    return World(clients={"alice": 1_000_000, "bob": 50_000})


@pytest.fixture
def state(world: World) -> EpochState:
    """Genesis, six participants, and job j1 with shard s1 (2 requests) committed by exec-a."""
    st = EpochState.from_genesis(world.genesis)
    for name, weight in WEIGHTS.items():
        st.apply(world.join(name, weight))
    st.apply(world.job("j1"))
    st.apply(world.assign_to(st, "j1", "s1", "exec-a", 2))
    st.apply(world.commit("j1", "s1", "exec-a", n_tokens=100))
    return st


@pytest.fixture
def disputed(world: World, state: EpochState) -> EpochState:
    """`state` after s1's assigned verifier failed it: a dispute is open."""
    state.apply(world.judge(state, "j1", "s1", passed=False))
    return state


def _verifier(st: EpochState, job_id: str = "j1", shard_id: str = "s1") -> str:
    return next(iter(st.batch(job_id, shard_id).verdicts))


# --- opening a dispute and drawing its panel ---------------------------------------------------


def test_a_failing_verdict_opens_a_dispute(world: World, disputed: EpochState) -> None:
    verifier = _verifier(disputed)
    block, panel = disputed.dispute_panel("j1", "s1")
    assert block == world.genesis_hash  # the verdict is at height 0 (no block begun)
    eligible = {n: w for n, w in WEIGHTS.items() if n not in ("exec-a", verifier)}
    assert panel == choose_panel(block, "s1", (), eligible, 3)
    assert len(panel) == len(set(panel)) == 3
    assert "exec-a" not in panel and verifier not in panel
    assert disputed.batch("j1", "s1").dispute == "open"
    [d] = disputed.disputes()
    assert (d.job_id, d.shard_id, d.executor, d.verifier) == ("j1", "s1", "exec-a", verifier)
    assert d.panel == tuple(panel) and d.votes == {} and d.outcome == "open"
    snap = disputed.snapshot()["jobs"]["j1"]["shards"]["s1"]["batch"]["dispute"]
    assert snap["verifier"] == verifier and snap["votes"] == {}


def test_a_passing_verdict_opens_none(world: World, state: EpochState) -> None:
    state.apply(world.judge(state, "j1", "s1", passed=True))
    assert state.batch("j1", "s1").dispute is None and state.disputes() == []
    with pytest.raises(InvalidRecord, match="no dispute is open"):
        state.dispute_panel("j1", "s1")


def _chain_state(world: World, dispute_block: str | None) -> EpochState:
    """Joins in block 1; job, assignment and commit in block 2; the failing verdict in block 3;
    block 4 begun with `dispute_block` as the hash of block 3 (None: not begun yet)."""
    st = EpochState.from_genesis(world.genesis)
    st.begin_block(1, world.genesis_hash)
    for name, weight in WEIGHTS.items():
        st.apply(world.join(name, weight))
    st.begin_block(2, "b1" * 32)
    st.apply(world.job("j1"))
    st.apply(world.assign_to(st, "j1", "s1", "exec-a", 2))
    st.apply(world.commit("j1", "s1", "exec-a"))
    st.begin_block(3, "b2" * 32)
    st.apply(world.judge(st, "j1", "s1", passed=False))
    if dispute_block is not None:
        st.begin_block(4, dispute_block)
    return st


def test_panel_is_drawn_from_the_block_holding_the_failing_verdict(world: World) -> None:
    st = _chain_state(world, None)
    verifier = _verifier(st)
    with pytest.raises(InvalidRecord, match="block 3, which holds its failing verdict"):
        st.dispute_panel("j1", "s1")
    assert st.disputes()[0].panel is None and st.batch("j1", "s1").dispute == "open"
    member = next(n for n in WEIGHTS if n not in ("exec-a", verifier))
    b = st.batch("j1", "s1")
    early = sign_record(world.identity(member), DisputeVote(
        "j1", "s1", "exec-a", b.merkle_root or "", b.sample_block or "", "cc" * 32, 2, 1,
        False, evidence_digest({}), {}))
    rejects(st, early, r"dispute block .* \(block 3\) is not final yet", permanent=False)

    eligible = {n: w for n, w in WEIGHTS.items() if n not in ("exec-a", verifier)}
    panels = set()
    for i in range(12):
        h3 = canonical_hash({"block": i})
        st = _chain_state(world, h3)
        block, panel = st.dispute_panel("j1", "s1")
        assert block == h3
        assert panel == choose_panel(h3, "s1", (), eligible, 3)  # deterministic in the hash
        assert _chain_state(world, h3).dispute_panel("j1", "s1") == (block, panel)
        panels.add(tuple(sorted(panel)))
    assert len(panels) > 1  # another block hash, another panel
    # a vote naming another block than the one holding the verdict is refused for good
    vote = world.vote(st, "j1", "s1", panel[0])
    rejects(st, _resign(world, vote, dispute_block="b2" * 32),
            r"dispute_block b2b2.* is not .* block 3 that holds the failing verdict",
            permanent=True)
    st.apply(vote)


def test_choose_panel_is_weighted_without_replacement() -> None:
    weights = {"a": 1, "b": 1, "c": 98, "x": 50, "zero": 0}
    first = {"a": 0, "b": 0, "c": 0}
    for i in range(400):
        panel = choose_panel(f"{i:064x}", "s", {"x"}, weights, 2)
        assert len(panel) == len(set(panel)) == 2 and "x" not in panel and "zero" not in panel
        first[panel[0]] += 1
    assert first["c"] > 300 and first["a"] + first["b"] > 0  # by weight, not a fixed order
    assert choose_panel("ab" * 32, "s", {"x"}, weights, 10) == \
        choose_panel("ab" * 32, "s", {"x"}, dict(reversed(list(weights.items()))), 10)
    assert sorted(choose_panel("ab" * 32, "s", {"x"}, weights, 10)) == ["a", "b", "c"]
    assert choose_panel("ab" * 32, "s", {"a", "b", "c", "x"}, weights, 3) == []


def test_panel_size_is_a_genesis_parameter(world: World) -> None:
    world.genesis["params"]["dispute_panel_size"] = 1
    st = EpochState.from_genesis(world.genesis)
    assert st.params["dispute_panel_size"] == 1
    for name, weight in WEIGHTS.items():
        st.apply(world.join(name, weight))
    st.apply(world.job("j1"))
    st.apply(world.assign_to(st, "j1", "s1", "exec-a", 2))
    st.apply(world.commit("j1", "s1", "exec-a"))
    st.apply(world.judge(st, "j1", "s1", passed=False))
    assert len(st.dispute_panel("j1", "s1")[1]) == 1
    world.genesis["params"]["dispute_panel_size"] = 0
    with pytest.raises(GonkaError, match="dispute_panel_size must be >= 1"):
        EpochState.from_genesis(world.genesis)


def test_network_config_puts_the_panel_size_in_genesis() -> None:
    from gonka_hpc.config import default_config_path, genesis, load_config

    cfg, _ = load_config(default_config_path())
    w = World()
    names = [*cfg.validator_names(), *(c.name for c in cfg.clients)]
    doc = genesis(cfg, {n: w.identity(n).public_hex for n in names})
    assert doc["params"]["dispute_panel_size"] == cfg.network.dispute_panel_size == 3
    assert EpochState.from_genesis(doc).params["dispute_panel_size"] == 3


# --- who may vote, and what a vote must say -----------------------------------------------------


def test_only_panel_members_vote(world: World, disputed: EpochState) -> None:
    verifier = _verifier(disputed)
    _, panel = disputed.dispute_panel("j1", "s1")
    outsider = next(n for n in WEIGHTS if n not in (*panel, "exec-a", verifier))
    member = panel[0]
    good = world.vote(disputed, "j1", "s1", member)
    for name in (outsider, "exec-a", verifier):
        rejects(disputed, sign_record(world.identity(name), good.typed_body()),
                f"'{name}' is not on the dispute panel", permanent=True)
    rejects(disputed, sign_record(world.identity("alice"), good.typed_body()),
            "dispute voter 'alice' is not a participant", permanent=False)
    forged = SignedRecord(good.kind, good.signer, good.body, good.signature[:-2] + "00")
    rejects(disputed, forged, "bad signature", permanent=True)
    disputed.apply(good)
    assert disputed.disputes()[0].votes == {member: False}


def test_each_member_votes_once(world: World, disputed: EpochState) -> None:
    member = disputed.dispute_panel("j1", "s1")[1][0]
    first = world.vote(disputed, "j1", "s1", member, passed=False)
    disputed.apply(first)
    rejects(disputed, first, "already applied", permanent=True)  # the same record again
    rejects(disputed, world.vote(disputed, "j1", "s1", member, passed=True),
            f"'{member}' already voted on the dispute", permanent=True)
    assert disputed.disputes()[0].votes == {member: False}


def test_votes_only_on_open_disputes(world: World, state: EpochState) -> None:
    member = next(n for n in WEIGHTS if n != "exec-a")
    b = state.batch("j1", "s1")
    body = DisputeVote("j1", "s1", "exec-a", b.merkle_root or "", world.genesis_hash,
                       world.genesis_hash, 2, 1, False, evidence_digest({}), {})
    rec = sign_record(world.identity(member), body)
    rejects(state, rec, r"no dispute is open .* \(no failing verdict yet\)", permanent=False)
    state.apply(world.judge(state, "j1", "s1", passed=True))
    rejects(state, rec, "no dispute on shard 's1' of job 'j1': its verdict passed",
            permanent=True)
    rejects(state, sign_record(world.identity(member), dataclasses.replace(body, shard_id="s9")),
            "unknown shard 's9'", permanent=False)


@pytest.mark.parametrize("changes, pattern", [
    ({"executor": "exec-b"}, "names executor 'exec-b'"),
    ({"merkle_root": "00" * 32}, "merkle_root does not match"),
    ({"sample_block": "00" * 32}, "sample_block 0000.* is not the batch's sample block"),
    ({"checked": 2, "failed": 3}, r"counts out of range"),
    ({"checked": 2, "failed": 1, "passed": True}, "passed must be"),
    ({"checked": 1, "failed": 1}, "reputation 0: all 2 requests must be checked"),
    ({"evidence_sha256": "AB" * 32}, "not 64 lower-case hex"),
    ({"evidence_sha256": "ab" * 31}, "not 64 lower-case hex"),
    ({"evidence": {"note": "edited after hashing"}}, "is not the digest"),
])
def test_vote_fields_are_checked(world: World, disputed: EpochState, changes: dict,  # type: ignore[type-arg]
                                 pattern: str) -> None:
    member = disputed.dispute_panel("j1", "s1")[1][0]
    good = world.vote(disputed, "j1", "s1", member)
    rejects(disputed, _resign(world, good, **changes), pattern, permanent=True)
    disputed.apply(good)


def test_vote_evidence_is_bound_by_its_digest(world: World, disputed: EpochState) -> None:
    member = disputed.dispute_panel("j1", "s1")[1][0]
    evidence = {"failed_requests": ["j1:0"], "worst": {"max_margin": 3.5}}
    vote = world.vote(disputed, "j1", "s1", member, evidence=evidence)
    assert vote.body["evidence_sha256"] == evidence_digest(evidence)
    disputed.apply(vote)
    snap = disputed.snapshot()["jobs"]["j1"]["shards"]["s1"]["batch"]["dispute"]
    assert snap["votes"][member]["evidence_sha256"] == evidence_digest(evidence)


# --- deciding ------------------------------------------------------------------------------------


def _by_weight(st: EpochState) -> list[str]:
    _, panel = st.dispute_panel("j1", "s1")
    return sorted(panel, key=lambda n: (-WEIGHTS[n], n))


def test_more_than_two_thirds_fail_forfeits_and_refunds(world: World,
                                                        disputed: EpochState) -> None:
    w = world
    panel = _by_weight(disputed)
    total = sum(WEIGHTS[n] for n in panel)
    supply = disputed.total_supply()
    # exec-a also did honest-looking work on another job: forfeiting takes all of it
    disputed.apply(w.job("j2", client="bob", escrow=5_000))
    disputed.apply(w.assign_to(disputed, "j2", "s2", "exec-a", 1))
    disputed.apply(w.commit("j2", "s2", "exec-a", n_tokens=50, n_requests=1))
    disputed.apply(w.judge(disputed, "j2", "s2", passed=True))
    cast = 0
    for name in panel:  # heaviest first, until the failing weight is over 2/3
        assert disputed.batch("j1", "s1").dispute == "open"
        disputed.apply(w.vote(disputed, "j1", "s1", name, passed=False))
        cast += WEIGHTS[name]
        if 3 * cast > 2 * total:
            break
    assert disputed.batch("j1", "s1").dispute == "fail"
    late = [n for n in panel if n not in disputed.disputes()[0].votes]
    for name in late:  # a late vote is recorded but cannot change a decided outcome
        disputed.apply(w.vote(disputed, "j1", "s1", name, passed=True))
        assert disputed.batch("j1", "s1").dispute == "fail"
    disputed.apply(w.close())
    s = disputed.settlement
    assert s is not None
    assert s["forfeited"] == ["exec-a"] and s["payments"] == {}
    assert s["refunds"] == {"alice": 10_000, "bob": 5_000}
    assert disputed.balance("exec-a") == 0 and disputed.reputation("exec-a") == 0
    [d] = s["disputes"]
    assert d["outcome"] == "fail" and d["executor"] == "exec-a"
    assert d["verifier"] == _verifier(disputed) and sorted(d["votes"]) == sorted(panel)
    assert s["overturned"] == [] and s["unverified"] == []
    assert disputed.total_supply() == supply


def test_more_than_two_thirds_pass_pays_and_overturns_the_verdict(world: World,
                                                                  state: EpochState) -> None:
    w = world
    _, verifier = state.verification_duty("j1", "s1")
    # the verifier's own work passes, so without the overturn its reputation would rise to 1
    other_ta = next(n for n in ("exec-b", "v1") if n != verifier)  # a ta never executes
    state.apply(w.job("j2", client="bob", escrow=5_000, ta=other_ta))
    state.apply(w.assign_to(state, "j2", "s2", verifier, 1))
    state.apply(w.commit("j2", "s2", verifier, n_tokens=40, n_requests=1))
    state.apply(w.judge(state, "j2", "s2", passed=True))
    state.apply(w.judge(state, "j1", "s1", passed=False))
    supply = state.total_supply()
    for rec in w.panel_votes(state, "j1", "s1", passed=True):
        state.apply(rec)
    assert state.batch("j1", "s1").dispute == "pass"
    state.apply(w.close())
    s = state.settlement
    assert s is not None
    assert s["forfeited"] == [] and s["unverified"] == []
    assert s["payments"] == {"exec-a": 1_000, verifier: 400}
    assert s["disputes"][0]["outcome"] == "pass" and s["overturned"] == [verifier]
    assert state.reputation("exec-a") == 1  # the panel cleared it
    assert state.reputation(verifier) == 0  # a false accusation
    assert s["refunds"] == {"alice": 9_000, "bob": 4_600}
    assert state.total_supply() == supply


def test_undecided_at_close_is_refunded_not_forfeited(world: World,
                                                      disputed: EpochState) -> None:
    w = world
    lightest = _by_weight(disputed)[-1]
    disputed.apply(w.vote(disputed, "j1", "s1", lightest, passed=False))  # < 2/3 of the weight
    disputed.apply(w.job("j2", client="bob", escrow=5_000))
    disputed.apply(w.assign_to(disputed, "j2", "s2", "exec-a", 1))
    disputed.apply(w.commit("j2", "s2", "exec-a", n_tokens=50, n_requests=1))
    disputed.apply(w.judge(disputed, "j2", "s2", passed=True))
    supply = disputed.total_supply()
    assert disputed.batch("j1", "s1").dispute == "open"
    disputed.apply(w.close())
    s = disputed.settlement
    assert s is not None
    assert s["forfeited"] == [] and s["unverified"] == ["s1"]
    assert s["disputes"][0]["outcome"] == "undecided"
    assert s["disputes"][0]["votes"] == {lightest: False}
    assert s["payments"] == {"exec-a": 500}  # its undisputed batch is still paid
    assert s["refunds"] == {"alice": 10_000, "bob": 4_500}
    assert disputed.reputation("exec-a") == 1 and s["overturned"] == []
    assert disputed.total_supply() == supply


def test_exactly_two_thirds_does_not_decide() -> None:
    w = World()
    st = EpochState.from_genesis(w.genesis)
    for name in ("ta", "ex", "a", "b", "c", "d"):
        st.apply(w.join(name, 10))
    st.apply(w.job("j1"))
    st.apply(w.assign_to(st, "j1", "s1", "ex", 2))
    st.apply(w.commit("j1", "s1", "ex"))
    st.apply(w.judge(st, "j1", "s1", passed=False))
    _, panel = st.dispute_panel("j1", "s1")
    assert len(panel) == 3  # four eligible, all of weight 10
    st.apply(w.vote(st, "j1", "s1", panel[0], passed=False))
    st.apply(w.vote(st, "j1", "s1", panel[1], passed=False))
    assert st.batch("j1", "s1").dispute == "open"  # 20 of 30 is not more than 2/3
    st.apply(w.vote(st, "j1", "s1", panel[2], passed=True))
    assert st.batch("j1", "s1").dispute == "open"  # split: undecided for good
    st.apply(w.close())
    s = st.settlement
    assert s is not None and s["forfeited"] == [] and s["unverified"] == ["s1"]


def test_with_nobody_to_appeal_to_the_failing_verdict_stands() -> None:
    w = World()
    st = EpochState.from_genesis(w.genesis)
    for name in ("ta", "x"):
        st.apply(w.join(name))
    st.apply(w.job("j1", escrow=3_000))
    st.apply(w.assign_to(st, "j1", "s1", "x", 2))
    st.apply(w.commit("j1", "s1", "x"))
    st.apply(w.judge(st, "j1", "s1", passed=False))
    assert st.dispute_panel("j1", "s1")[1] == []
    assert st.batch("j1", "s1").dispute == "fail"
    st.apply(w.close())
    s = st.settlement
    assert s is not None and s["forfeited"] == ["x"] and s["refunds"] == {"alice": 3_000}


# --- replay and conservation ---------------------------------------------------------------------


def test_votes_are_in_the_state_hash_and_replay(world: World) -> None:
    """The epoch as dict blocks (so `replay` can hash them): joins, job and commit; the
    failing verdict; the panel's votes."""
    w = world
    st = EpochState.from_genesis(w.genesis)
    blocks: list[dict[str, list]] = []  # type: ignore[type-arg]

    def block(*makers) -> list[SignedRecord]:  # type: ignore[no-untyped-def]
        st.begin_block(len(blocks) + 1, canonical_hash(blocks[-1]) if blocks
                       else w.genesis_hash)
        recs = []
        for make in makers:
            recs.append(make())
            st.apply(recs[-1])
        blocks.append({"records": [r.to_dict() for r in recs]})
        return recs

    block(*[lambda n=n, wt=wt: w.join(n, wt) for n, wt in WEIGHTS.items()])
    block(lambda: w.job("j1"), lambda: w.assign_to(st, "j1", "s1", "exec-a", 2),
          lambda: w.commit("j1", "s1", "exec-a"))
    block(lambda: w.judge(st, "j1", "s1", passed=False))
    st.begin_block(4, canonical_hash(blocks[-1]))  # the verdict's block is final
    before = st.state_hash()
    votes = w.panel_votes(st, "j1", "s1", passed=False)
    for v in votes:
        st.apply(v)
    assert st.state_hash() != before
    blk4 = {"records": [v.to_dict() for v in votes]}
    again = replay(w.genesis, [*blocks, blk4])
    assert again.state_hash() == st.state_hash()
    assert again.disputes() == st.disputes() and again.disputes()[0].outcome == "fail"
    # one vote fewer is another state
    fewer = replay(w.genesis, [*blocks, {"records": blk4["records"][:-1]}])
    assert fewer.state_hash() != st.state_hash()


def _outcome(st: EpochState, job_id: str, shard_id: str) -> str:
    """The 2/3 rule, re-implemented from the public views (the oracle of the random test)."""
    d = next(x for x in st.disputes() if (x.job_id, x.shard_id) == (job_id, shard_id))
    weights = {n: p.weight for n, p in st.participants().items()}
    if d.panel == ():
        return "fail"
    if d.panel is None:
        return "open"
    total = sum(weights[n] for n in d.panel)
    fail = sum(weights[n] for n, ok in d.votes.items() if not ok)
    ok = sum(weights[n] for n, ok in d.votes.items() if ok)
    return "fail" if 3 * fail > 2 * total else "pass" if 3 * ok > 2 * total else "open"


@pytest.mark.parametrize("seed", range(1, 9))
def test_random_disputes_settle_by_the_two_thirds_rule(seed: int) -> None:
    rng = random.Random(seed)
    print(f"seed {seed}")
    w = World(clients={"alice": 200_000, "bob": 200_000})
    st = EpochState.from_genesis(w.genesis)
    names = ["ta", "p1", "p2", "p3", "p4", "p5"][:rng.randint(3, 6)]
    for name in names:
        st.apply(w.join(name, rng.choice([1, 5, 10, 40])))
    supply = st.total_supply()
    escrowed = 0
    for j in range(rng.randint(2, 5)):
        job = f"j{j}"
        escrow = 5_000 * rng.randint(1, 3)
        st.apply(w.job(job, client=rng.choice(["alice", "bob"]), escrow=escrow, n_requests=6))
        escrowed += escrow
        for k in range(rng.randint(1, 2)):
            ex = rng.choice(names[1:])
            st.apply(w.assign_to(st, job, f"{job}-s{k}", ex, rng.randint(1, 2)))
            b = st.batch(job, f"{job}-s{k}")
            if rng.random() < 0.9:
                st.apply(w.commit(job, b.shard_id, ex, n_tokens=rng.randint(0, 200),
                                  n_requests=len(b.request_ids)))
                if rng.random() < 0.85:
                    st.apply(w.judge(st, job, b.shard_id, passed=rng.random() < 0.5))
    if rng.random() < 0.5:
        w.next_block(st)  # votes from a later block than the verdicts
    rejected = 0
    for d in st.disputes():
        _, panel = st.dispute_panel(d.job_id, d.shard_id)
        for member in panel:
            if rng.random() < 0.75:
                st.apply(w.vote(st, d.job_id, d.shard_id, member, passed=rng.random() < 0.4))
        for bad in [n for n in names if n not in panel][:1] + panel[:1]:
            try:  # an outsider, or a second vote: never accepted
                st.apply(w.vote(st, d.job_id, d.shard_id, bad, passed=True))
            except InvalidRecord:
                rejected += 1
            else:
                assert bad in panel and bad not in d.votes, bad
        assert st.total_supply() == supply
    outcomes = {(d.job_id, d.shard_id): _outcome(st, d.job_id, d.shard_id)
                for d in st.disputes()}
    assert outcomes == {(d.job_id, d.shard_id): d.outcome for d in st.disputes()}
    batches = [b for b in st.batches() if b.committed]
    st.apply(w.close())
    s = st.settlement
    assert s is not None
    assert st.total_supply() == supply and all(st.escrow(j) == 0 for j in st.jobs())
    cheaters = sorted({b.executor for b in batches
                       if outcomes.get((b.job_id, b.shard_id)) == "fail"})
    assert s["forfeited"] == cheaters
    payments: dict[str, int] = {}
    for b in batches:
        outcome = outcomes.get((b.job_id, b.shard_id))
        if b.executor not in cheaters and b.verdicts and outcome in (None, "pass"):
            payments[b.executor] = payments.get(b.executor, 0) + b.n_tokens * 10
    assert s["payments"] == {p: a for p, a in sorted(payments.items()) if a > 0}
    assert sum(s["refunds"].values()) + sum(s["payments"].values()) == escrowed
    assert {x["shard_id"] for x in s["disputes"] if x["outcome"] == "undecided"
            and x["executor"] not in cheaters} <= set(s["unverified"])
    assert sorted({x["verifier"] for x in s["disputes"] if x["outcome"] == "pass"}) == \
        s["overturned"]
    assert all(st.reputation(v) == 0 for v in s["overturned"])
    assert rejected >= 1 or not st.disputes()


# --- the chain and the real re-check -------------------------------------------------------------


def test_a_dispute_replays_through_an_audited_chain(world: World, tmp_path: Path) -> None:
    from ledger.audit import audit_chain

    w = world
    panel_size = 3  # six participants: four eligible besides executor and verifier

    def vote(i: int):  # type: ignore[no-untyped-def]
        return lambda st: w.vote(st, "j1", "s1", st.dispute_panel("j1", "s1")[1][i],
                                 passed=False)

    w.build_chain(tmp_path / "chain", [
        [w.join(n, wt) for n, wt in WEIGHTS.items()],
        [w.job("j1"), lambda st: w.assign_to(st, "j1", "s1", "exec-a", 2),
         w.commit("j1", "s1", "exec-a")],
        [lambda st: w.judge(st, "j1", "s1", passed=False)],
        [vote(i) for i in range(panel_size)],
        [w.close()],
    ])
    st = audit_chain(tmp_path / "chain").state
    s = st.settlement
    assert s is not None and s["forfeited"] == ["exec-a"]
    [d] = st.disputes()
    assert d.height == 3 and d.outcome == "fail" and len(d.votes) == panel_size
    assert d.dispute_block == st.block_hash(3)


def test_recheck_signs_the_same_evidence_as_the_verifier(tiny_model, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from gonka_hpc.artifacts import Inference, file_sha256, write_batch
    from gonka_hpc.config import REPO_ROOT
    from gonka_hpc.engines.base import GenerationRequest
    from gonka_hpc.engines.reference import ReferenceEngine
    from gonka_hpc.identity import Identity
    from gonka_hpc.sampling import SamplingParams, derive_seed
    from gonka_hpc.spool import Shard, ShardRequest
    from verify.dispute import recheck
    from verify.thresholds import load_thresholds
    from verify.verifier import verify_batch

    th = load_thresholds(REPO_ROOT / "configs" / "verification.yaml")
    engine = ReferenceEngine(tiny_model.path, k=5, model_hash=tiny_model.content_hash)
    executor, first, member = (Identity.from_seed(n, bytes([i]) * 32)
                               for i, n in enumerate(("uni-b", "dc-c", "uni-a"), start=5))
    reqs = [GenerationRequest(f"job-1:{i}", tuple(engine.tokenizer.encode(p)), 10,
                              SamplingParams(0.9, 1.0, 0), derive_seed("ee" * 32, f"job-1:{i}",
                                                                       None))
            for i, p in enumerate(["the small cat", "a quick fox"])]
    gens = engine.generate(reqs)
    infs = [Inference(r.request_id, np.asarray(r.prompt_ids, np.int32),
                      np.asarray(g.output_ids, np.int32), g.token_logprobs, g.topk_ids,
                      g.topk_logprobs, r.seed, r.params.temperature, r.params.top_p,
                      r.params.top_k, r.max_tokens, g.finish_reason) for r, g in zip(reqs, gens)]
    shard = Shard("job-1", "job-1-uni-b", 1, "uni-b", "uni-a", "ee" * 32, "gonka-tiny",
                  engine.model_hash, 5, [ShardRequest(
                      r.request_id, i, r.request_id, "/v1/completions", list(r.prompt_ids),
                      r.max_tokens, r.params.temperature, r.params.top_p, r.params.top_k,
                      str(r.seed), [], None) for i, r in enumerate(reqs)])
    art = tmp_path / "b.h5"
    batch = write_batch(art, executor, epoch=1, job_id="job-1", shard_id="job-1-uni-b",
                        model_hash=engine.model_hash, engine="reference", engine_version="t",
                        dtype="float32", k=5, inferences=infs)
    assigned = {"job_id": "job-1", "shard_id": "job-1-uni-b", "executor": "uni-b",
                "request_ids": [r.request_id for r in reqs], "shard_hash": shard.sha256}
    # over-billing: the commit claims more tokens than the artifact holds, so the check fails
    committed = {"merkle_root": batch.header.merkle_root, "n_requests": 2,
                 "n_tokens": batch.header.n_tokens + 7, "model_hash": engine.model_hash,
                 "file_sha256": file_sha256(art)}
    kwargs = dict(artifact=art, shard=shard, assigned=assigned, executor_pubkey=executor.public_hex,
                  reputation=0, epoch=1)
    for commit, passed in ((committed, False),
                           ({**committed, "n_tokens": batch.header.n_tokens}, True)):
        verdict = verify_batch(first, engine, th, committed=commit, block_hash="ff" * 32,
                               **kwargs).verdict.typed_body()  # type: ignore[arg-type]
        check = recheck(member, engine, th, committed=commit, sample_block="ff" * 32,
                        dispute_block="dd" * 32, **kwargs)  # type: ignore[arg-type]
        check.vote.verify(member.public_hex)
        vote = check.vote.typed_body()
        assert isinstance(vote, DisputeVote) and check.vote.signer == "uni-a"
        assert (vote.passed, vote.checked, vote.failed) == \
            (verdict.passed, verdict.checked, verdict.failed)
        assert vote.passed is passed and vote.checked == 2
        assert vote.evidence == verdict.evidence
        assert vote.evidence_sha256 == evidence_digest(vote.evidence)
        assert (vote.sample_block, vote.dispute_block) == ("ff" * 32, "dd" * 32)
        assert SignedRecord.decode(check.vote.encode()) == check.vote
        if not passed:
            assert any("n_tokens" in p for p in check.binding_problems)
