"""The epoch state machine (ledger/state.py): every rule, settlement math, conservation.

Each record rule is tested twice: the good record applies, and a bad one is rejected with a
reason that names the problem while the state (hash and money) stays exactly as it was. The
settlement tests compute rewards, refunds and reputation by hand. Conservation is checked
after every record of seeded random sequences of good and bad records (hypothesis is not in
the venv; the seed is printed so a failure can be replayed).
"""

from __future__ import annotations

import random
import re

import pytest

from gonka_hpc.canonical import canonical_bytes
from gonka_hpc.records import (
    ArtifactBatchCommitted,
    EpochClose,
    InferenceAssigned,
    JobAccepted,
    OutputDelivered,
    ParticipantJoined,
    SignedRecord,
    Verdict,
    escrow_authorization_bytes,
    sign_record,
)
from ledger.state import EpochState, InvalidRecord, replay
from ledger.testkit import World

# --- helpers ---------------------------------------------------------------------------------


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


@pytest.fixture
def world() -> World:
    return World(clients={"alice": 1_000_000, "bob": 50_000})


@pytest.fixture
def state(world: World) -> EpochState:
    """Genesis plus four participants: the TA, two executors and a verifier."""
    st = EpochState.from_genesis(world.genesis)
    for name, weight in (("ta", 10), ("exec-a", 10), ("exec-b", 20), ("ver", 5)):
        st.apply(world.join(name, weight))
    return st


@pytest.fixture
def committed(world: World, state: EpochState) -> EpochState:
    """A job with one shard assigned to exec-a and committed (100 tokens)."""
    for rec in (world.job("j1"), world.assign("j1", "s1", "exec-a"),
                world.commit("j1", "s1", "exec-a", n_tokens=100)):
        state.apply(rec)
    return state


# --- generic rules ---------------------------------------------------------------------------


def test_genesis_state_is_canonical_and_deterministic(world: World) -> None:
    a, b = EpochState.from_genesis(world.genesis), EpochState.from_genesis(world.genesis)
    assert canonical_bytes(a.snapshot())
    assert a.state_hash() == b.state_hash()
    assert a.total_supply() == 1_000_000 + 1_000_000 + 50_000
    assert a.balance("alice") == 1_000_000 and a.participants() == {}


def test_replayed_record_is_rejected(world: World, state: EpochState) -> None:
    rec = world.job("j1")
    state.apply(rec)
    rejects(state, rec, "already applied", permanent=True)


def test_unknown_signer_stays_pending(world: World, state: EpochState) -> None:
    rec = world.job("j1", ta="stranger")
    rejects(state, rec, "unknown signer 'stranger'", permanent=False)


def test_bad_signature_is_permanent(world: World, state: EpochState) -> None:
    good = world.job("j1")
    forged = SignedRecord(good.kind, good.signer, good.body, "00" * 64)
    rejects(state, forged, "bad signature by 'ta'", permanent=True)
    tampered = SignedRecord(good.kind, good.signer, {**good.body, "n_requests": 99},
                            good.signature)
    rejects(state, tampered, "bad signature", permanent=True)


def test_malformed_body_is_permanent(world: World, state: EpochState) -> None:
    good = world.job("j1")
    body = dict(good.body)
    del body["escrow"]
    rec = SignedRecord(good.kind, good.signer, body, good.signature)
    rejects(state, rec, "malformed job_accepted", permanent=True)


# --- participant_joined --------------------------------------------------------------------------


def test_join_good(world: World, state: EpochState) -> None:
    state.apply(world.join("newbie", 7))
    p = state.participant("newbie")
    assert (p.weight, p.reputation, p.balance) == (7, 0, 0)
    assert state.reputation("newbie") == 0
    assert p.pubkey == world.identity("newbie").public_hex


@pytest.mark.parametrize("name", ["exec-a", "alice", "treasury", "validator-1"])
def test_join_taken_name(world: World, state: EpochState, name: str) -> None:
    rejects(state, world.join(name, 3), f"name '{name}' is already taken", permanent=True)


def test_join_zero_weight(world: World, state: EpochState) -> None:
    rejects(state, world.join("zero", 0), "weight must be > 0", permanent=True)


def test_join_must_be_self_signed(world: World, state: EpochState) -> None:
    mallory = world.identity("mallory")
    rec = sign_record(mallory, ParticipantJoined("victim", mallory.public_hex, 5))
    rejects(state, rec, "must be self-signed", permanent=True)


def test_join_signature_must_match_body_pubkey(world: World, state: EpochState) -> None:
    me = world.identity("newbie")
    other = world.identity("other")
    rec = sign_record(me, ParticipantJoined("newbie", other.public_hex, 5))
    rejects(state, rec, "must verify with body.pubkey", permanent=True)


# --- job_accepted ----------------------------------------------------------------------------------


def test_job_good_moves_escrow(world: World, state: EpochState) -> None:
    supply = state.total_supply()
    state.apply(world.job("j1", escrow=12_345))
    assert state.balance("alice") == 1_000_000 - 12_345
    assert state.escrow("j1") == 12_345
    assert state.job("j1").client == "alice" and state.job("j1").ta == "ta"
    assert state.total_supply() == supply


def test_job_signed_by_other_than_ta(world: World, state: EpochState) -> None:
    good = world.job("j1")
    rec = sign_record(world.identity("exec-a"), JobAccepted(**good.typed_body().__dict__))
    rejects(state, rec, "names ta 'ta' but is signed by 'exec-a'")


def test_job_ta_not_participant(world: World, state: EpochState) -> None:
    rec = world.job("j1", ta="bob", client="alice")  # bob is a client, not a participant
    rejects(state, rec, "ta 'bob' is not a participant")


def test_job_client_not_client(world: World, state: EpochState) -> None:
    rejects(state, world.job("j1", client="exec-b"), "'exec-b' is not a client account",
            permanent=True)


def test_job_bad_client_authorization(world: World, state: EpochState) -> None:
    # The client authorized 10 units; the TA escrows 10,000.
    auth = world.identity("alice").sign(escrow_authorization_bytes("j1", "ta", "h", 10))
    rec = sign_record(world.identity("ta"), JobAccepted("j1", "alice", "ta", "h", 4, 10_000, auth))
    rejects(state, rec, "does not authorize this escrow", permanent=True)


def test_job_duplicate_id(world: World, state: EpochState) -> None:
    state.apply(world.job("j1"))
    rejects(state, world.job("j1", escrow=5), "job 'j1' already exists", permanent=True)


def test_job_escrow_over_balance(world: World, state: EpochState) -> None:
    state.apply(world.job("j1", client="bob", escrow=50_000))  # exactly the balance: fine
    rejects(state, world.job("j2", client="bob", escrow=1), "exceeds the balance 0 of 'bob'")


def test_job_negative_escrow(world: World, state: EpochState) -> None:
    rejects(state, world.job("j1", escrow=-1), "escrow must be >= 0")


# --- inference_assigned ------------------------------------------------------------------------------


def test_assign_good(world: World, state: EpochState) -> None:
    state.apply(world.job("j1"))
    state.apply(world.assign("j1", "s1", "exec-a", ("r0", "r1")))
    state.apply(world.assign("j1", "s2", "exec-b", ("r2",)))
    b = state.batch("j1", "s2")
    assert (b.executor, b.request_ids, b.committed) == ("exec-b", ("r2",), False)


def test_assign_unknown_job(world: World, state: EpochState) -> None:
    rejects(state, world.assign("nope", "s1", "exec-a"), "unknown job 'nope'")


def test_assign_not_by_ta(world: World, state: EpochState) -> None:
    state.apply(world.job("j1"))
    rejects(state, world.assign("j1", "s1", "exec-b", ta="exec-a"),
            "must be signed by its ta 'ta', not 'exec-a'")


def test_assign_executor_not_participant(world: World, state: EpochState) -> None:
    state.apply(world.job("j1"))
    rejects(state, world.assign("j1", "s1", "alice"), "executor 'alice' is not a participant",
            permanent=False)  # it may still join


def test_assign_executor_is_ta(world: World, state: EpochState) -> None:
    state.apply(world.job("j1"))
    rejects(state, world.assign("j1", "s1", "ta"), "never executes its own jobs")


def test_assign_duplicate_shard(world: World, state: EpochState) -> None:
    state.apply(world.job("j1"))
    state.apply(world.assign("j1", "s1", "exec-a", ("r0",)))
    rejects(state, world.assign("j1", "s1", "exec-b", ("r1",)), "already assigned",
            permanent=True)


def test_assign_duplicate_request_ids(world: World, state: EpochState) -> None:
    state.apply(world.job("j1"))
    state.apply(world.assign("j1", "s1", "exec-a", ("r0", "r1")))
    rejects(state, world.assign("j1", "s2", "exec-b", ("r1", "r2")),
            r"request ids already assigned in job 'j1': \['r1'\]")
    rejects(state, world.assign("j1", "s3", "exec-b", ("r5", "r5")), "duplicate request ids")


# --- artifact_batch_committed --------------------------------------------------------------------------


def test_commit_good(world: World, committed: EpochState) -> None:
    b = committed.batch("j1", "s1")
    assert b.committed and b.n_tokens == 100 and b.merkle_root == world.merkle_root("j1", "s1")


def test_commit_signer_not_executor(world: World, state: EpochState) -> None:
    state.apply(world.job("j1"))
    state.apply(world.assign("j1", "s1", "exec-a"))
    body = world.commit("j1", "s1", "exec-a").typed_body()
    rec = sign_record(world.identity("exec-b"), body)
    rejects(state, rec, "must be signed by its executor 'exec-a'")
    # exec-b claims the shard in its own name: still not the assigned executor.
    rejects(state, world.commit("j1", "s1", "exec-b"), "must be signed by its executor 'exec-a'")


def test_commit_twice(world: World, committed: EpochState) -> None:
    rejects(committed, world.commit("j1", "s1", "exec-a", n_tokens=1), "already committed",
            permanent=True)


def test_commit_n_requests_mismatch(world: World, state: EpochState) -> None:
    state.apply(world.job("j1"))
    state.apply(world.assign("j1", "s1", "exec-a", ("r0", "r1")))
    rejects(state, world.commit("j1", "s1", "exec-a", n_requests=3),
            "n_requests 3, shard was assigned 2")


def test_commit_over_escrow(world: World, state: EpochState) -> None:
    state.apply(world.job("j1", escrow=1_500))  # price 10: 150 tokens in all
    state.apply(world.assign("j1", "s1", "exec-a", ("r0", "r1")))
    state.apply(world.assign("j1", "s2", "exec-b", ("r2", "r3")))
    state.apply(world.commit("j1", "s1", "exec-a", n_tokens=100))
    rejects(state, world.commit("j1", "s2", "exec-b", n_tokens=51),
            "batch cost 510 plus 1000 already committed exceeds the escrow 1500")
    state.apply(world.commit("j1", "s2", "exec-b", n_tokens=50))  # exactly the escrow


def test_commit_unknown_shard(world: World, state: EpochState) -> None:
    state.apply(world.job("j1"))
    rejects(state, world.commit("j1", "s9", "exec-a"), "unknown shard 's9'", permanent=False)


# --- output_delivered ------------------------------------------------------------------------------


def test_delivered_good_once(world: World, state: EpochState) -> None:
    state.apply(world.job("j1"))
    rejects(state, world.deliver("j1", ta="exec-a"), "must be signed by its ta 'ta'")
    state.apply(world.deliver("j1"))
    assert state.job("j1").delivered
    rejects(state, world.deliver("j1"), "already applied|already delivered")
    again = sign_record(world.identity("ta"), OutputDelivered("j1", "0" * 64, 1, 0))
    rejects(state, again, "already delivered", permanent=True)


# --- verdict ---------------------------------------------------------------------------------------


def test_verdict_good(world: World, committed: EpochState) -> None:
    committed.apply(world.verdict("ver", "j1", "s1", "exec-a", passed=True))
    committed.apply(world.verdict("exec-b", "j1", "s1", "exec-a", passed=True))
    assert committed.batch("j1", "s1").verdicts == {"exec-b": True, "ver": True}


def test_verdict_by_executor(world: World, committed: EpochState) -> None:
    rejects(committed, world.verdict("exec-a", "j1", "s1", "exec-a"), "cannot judge its own")


def test_verdict_by_non_participant(world: World, committed: EpochState) -> None:
    rejects(committed, world.verdict("alice", "j1", "s1", "exec-a"),
            "verifier 'alice' is not a participant")


def test_verdict_before_commit_stays_pending(world: World, state: EpochState) -> None:
    state.apply(world.job("j1"))
    state.apply(world.assign("j1", "s1", "exec-a"))
    v = world.verdict("ver", "j1", "s1", "exec-a")
    rejects(state, v, "not committed yet", permanent=False)
    state.apply(world.commit("j1", "s1", "exec-a"))
    state.apply(v)  # the same record is valid once the commit is final


def test_verdict_wrong_root(world: World, committed: EpochState) -> None:
    rejects(committed, world.verdict("ver", "j1", "s1", "exec-a", merkle_root="ab" * 32),
            "merkle_root does not match", permanent=True)


def test_verdict_wrong_executor(world: World, committed: EpochState) -> None:
    rejects(committed, world.verdict("ver", "j1", "s1", "exec-b"),
            "shard's executor is 'exec-a'")


def test_verdict_twice_by_same_verifier(world: World, committed: EpochState) -> None:
    committed.apply(world.verdict("ver", "j1", "s1", "exec-a", passed=True))
    rejects(committed, world.verdict("ver", "j1", "s1", "exec-a", passed=False),
            "'ver' already judged", permanent=True)


def test_verdict_counts_checked(world: World, committed: EpochState) -> None:
    rec = sign_record(world.identity("ver"), Verdict(
        "j1", "s1", "exec-a", world.merkle_root("j1", "s1"), "ab" * 32, checked=1, failed=2,
        passed=False))
    rejects(committed, rec, "counts out of range")


# --- epoch_close -----------------------------------------------------------------------------------


def test_close_signer_must_be_validator(world: World, state: EpochState) -> None:
    rejects(state, sign_record(world.identity("ta"), EpochClose(1)),
            "'ta', who is not a genesis validator")


def test_close_wrong_epoch(world: World, state: EpochState) -> None:
    rejects(state, world.close(epoch=2), "epoch_close for epoch 2, the current epoch is 1",
            permanent=True)


def test_close_once_then_everything_rejected(world: World, committed: EpochState) -> None:
    committed.apply(world.close(validator=2))
    assert committed.closed and committed.settlement is not None
    for rec in (world.close(validator=1), world.join("late"), world.job("j2"),
                world.verdict("ver", "j1", "s1", "exec-a")):
        rejects(committed, rec, "epoch 1 is closed", permanent=True)


# --- settlement ------------------------------------------------------------------------------------


def test_settlement_cheater_forfeits_and_clients_are_refunded(world: World,
                                                              state: EpochState) -> None:
    price = 10
    for rec in (
        world.job("j1", client="alice", escrow=10_000),
        world.job("j2", client="bob", escrow=5_000),
        world.assign("j1", "s1", "exec-a", ("r0",)),
        world.assign("j1", "s2", "exec-b", ("r1",)),
        world.assign("j2", "s3", "exec-b", ("r0",)),
        world.commit("j1", "s1", "exec-a", n_tokens=100, n_requests=1),
        world.commit("j1", "s2", "exec-b", n_tokens=200, n_requests=1),
        world.commit("j2", "s3", "exec-b", n_tokens=100, n_requests=1),
        world.verdict("ver", "j1", "s1", "exec-a", passed=True),
        world.verdict("ver", "j1", "s2", "exec-b", passed=False),  # exec-b is caught
        world.verdict("exec-a", "j2", "s3", "exec-b", passed=True),  # one pass does not save it
    ):
        state.apply(rec)
    supply = state.total_supply()
    state.apply(world.close())
    s = state.settlement
    assert s is not None
    assert s["forfeited"] == ["exec-b"]
    # alice: 2,000 for the cheated batch + 7,000 unused; bob: all 5,000 back.
    assert s["refunds"] == {"alice": 2_000 + 7_000, "bob": 5_000}
    assert s["pool_from_work"] == 100 * price and s["subsidy"] == 100_000
    assert s["pool"] == 101_000
    assert s["rewards"] == {"exec-a": 101_000}  # the only honest participant with work
    assert s["returned_to_treasury"] == 0
    assert state.balance("alice") == 1_000_000 - 10_000 + 9_000
    assert state.balance("bob") == 50_000
    assert state.balance("exec-b") == 0
    assert state.balance("exec-a") == 101_000
    assert state.balance("treasury") == 1_000_000 - 100_000
    assert state.escrow("j1") == state.escrow("j2") == 0
    assert state.reputation("exec-b") == 0 and state.reputation("exec-a") == 1
    assert state.reputation("ver") == 0  # no work, no verdict on it
    assert state.total_supply() == supply


def test_settlement_shares_by_weight_times_tokens_remainder_to_treasury() -> None:
    w = World(epoch_subsidy=100_001)
    st = EpochState.from_genesis(w.genesis)
    for name, weight in (("ta", 1), ("a", 10), ("c", 20), ("idle", 50)):
        st.apply(w.join(name, weight))
    for rec in (w.job("j1"), w.assign("j1", "s1", "a", ("r0",)), w.assign("j1", "s2", "c", ("r1",)),
                w.commit("j1", "s1", "a", n_tokens=100, n_requests=1),
                w.commit("j1", "s2", "c", n_tokens=100, n_requests=1),
                w.verdict("idle", "j1", "s2", "c", passed=True)):
        st.apply(rec)
    st.apply(w.close())
    s = st.settlement
    assert s is not None
    pool = 2 * 100 * 10 + 100_001  # 102,001
    assert s["pool"] == pool
    # scores: a 10*100 = 1,000; c 20*100 = 2,000
    assert s["rewards"] == {"a": pool * 1_000 // 3_000, "c": pool * 2_000 // 3_000}
    assert s["rewards"] == {"a": 34_000, "c": 68_000}
    assert s["returned_to_treasury"] == 1
    assert st.balance("treasury") == 1_000_000 - 100_001 + 1
    assert "idle" not in s["rewards"]
    assert st.reputations() == {"a": 0, "c": 1, "idle": 0, "ta": 0}
    assert st.balance("alice") == 1_000_000 - 2_000


def test_settlement_subsidy_capped_by_treasury_and_no_honest_work() -> None:
    w = World(treasury=500, epoch_subsidy=100_000)
    st = EpochState.from_genesis(w.genesis)
    for name in ("ta", "x", "v"):
        st.apply(w.join(name))
    for rec in (w.job("j1", escrow=3_000), w.assign("j1", "s1", "x"),
                w.commit("j1", "s1", "x", n_tokens=100),
                w.verdict("v", "j1", "s1", "x", passed=False)):
        st.apply(rec)
    st.apply(w.close())
    s = st.settlement
    assert s is not None
    assert s["subsidy"] == 500 and s["pool"] == 500 and s["rewards"] == {}
    assert s["returned_to_treasury"] == 500  # no honest work: the pool goes back
    assert st.balance("treasury") == 500
    assert st.balance("alice") == 1_000_000  # everything refunded
    assert s["forfeited"] == ["x"]


def test_settlement_empty_epoch(world: World) -> None:
    st = EpochState.from_genesis(world.genesis)
    st.apply(world.close())
    s = st.settlement
    assert s is not None and s["pool"] == 100_000 and s["rewards"] == {}
    assert st.balance("treasury") == 1_000_000


# --- replay and conservation -------------------------------------------------------------------------


def test_replay_matches_incremental(world: World) -> None:
    recs = [world.join("ta"), world.join("exec-a"), world.job("j1"),
            world.assign("j1", "s1", "exec-a"), world.commit("j1", "s1", "exec-a")]
    st = EpochState.from_genesis(world.genesis)
    for r in recs:
        st.apply(r)
    blocks = [{"records": [r.to_dict() for r in recs[:2]]},
              {"records": [r.to_dict() for r in recs[2:]]}]
    assert replay(world.genesis, blocks).state_hash() == st.state_hash()
    with pytest.raises(InvalidRecord, match="block 2, record 0: record [0-9a-f]+ already applied"):
        replay(world.genesis, [{"records": blocks[0]["records"] + blocks[1]["records"][:1]},
                               {"records": blocks[1]["records"][:1]}])


def _random_record(rng: random.Random, w: World, st: EpochState) -> SignedRecord:
    """A record that is often valid (built from the state) and often subtly not."""
    def pick(good: list[str], bad: list[str], p_good: float = 0.8) -> str:
        return rng.choice(good) if good and rng.random() < p_good else rng.choice(bad)

    parts = list(st.participants())
    batches = st.batches()
    committed = [b for b in batches if b.committed]
    kind = rng.choices(["join", "job", "assign", "commit", "verdict", "deliver", "close",
                        "forged"], weights=[2, 3, 4, 4, 4, 1, 1, 1])[0]
    if kind == "join":
        return w.join(rng.choice(["ta", "p1", "p2", "p3", "alice"]), rng.choice([0, 1, 5, 9]))
    if kind == "job":
        return w.job(f"j{rng.randrange(20)}", client=rng.choice(["alice", "bob", "p1"]),
                     ta=pick(parts, ["ta", "zed"]), escrow=rng.choice([0, 100, 5_000, 60_000]))
    if kind == "assign":
        jobs = list(st.jobs())
        job = pick(jobs, ["j1", "nojob"])
        ta = st.job(job).ta if job in jobs and rng.random() < 0.8 else rng.choice(["ta", "p1"])
        rids = tuple(rng.sample([f"r{i}" for i in range(12)], rng.randint(1, 2)))
        return w.assign(job, f"s{rng.randrange(6)}", pick(parts, ["alice"]), rids, ta=ta)
    if kind == "commit":
        if batches and rng.random() < 0.85:
            b = rng.choice(batches)
            n_req = len(b.request_ids) if rng.random() < 0.9 else 7
            ex = b.executor if rng.random() < 0.9 else pick(parts, ["alice"])
            return w.commit(b.job_id, b.shard_id, ex, n_tokens=rng.choice([0, 10, 200, 1_000]),
                            n_requests=n_req)
        return w.commit("j1", "s1", pick(parts, ["alice"]))
    if kind == "verdict":
        if committed and rng.random() < 0.9:
            b = rng.choice(committed)
            return w.verdict(pick(parts, ["alice"]), b.job_id, b.shard_id, b.executor,
                             passed=rng.random() < 0.7)
        return w.verdict(pick(parts, ["alice"]), "j1", "s1", "p1")
    if kind == "deliver":
        jobs = list(st.jobs())
        job = pick(jobs, ["nojob"])
        return w.deliver(job, ta=st.job(job).ta if job in jobs else "ta")
    if kind == "close":
        return w.close(epoch=2)  # wrong epoch; the test closes epoch 1 at the end
    good = w.job(rng.choice(["j1", "j9"]))
    return SignedRecord(good.kind, good.signer, good.body, good.signature[:-2] + "00")


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5, 6])
def test_money_is_conserved_over_random_sequences(seed: int) -> None:
    rng = random.Random(seed)
    print(f"seed {seed}")
    w = World(clients={"alice": 100_000, "bob": 20_000})
    st = EpochState.from_genesis(w.genesis)
    supply = st.total_supply()
    applied: list[SignedRecord] = []
    n_ok = 0
    for _ in range(300):
        rec = _random_record(rng, w, st)
        before = st.state_hash()
        try:
            st.apply(rec)
        except InvalidRecord:
            assert st.state_hash() == before  # failure leaves the state unchanged
        else:
            applied.append(rec)
            n_ok += 1
        assert st.total_supply() == supply
        assert all(b >= 0 for b in st.balances().values())
        assert all(st.escrow(j) >= 0 for j in st.jobs())
    assert n_ok >= 30  # the generator makes enough valid records to mean something
    # Closing at the end settles, and still conserves.
    if not st.closed:
        st.apply(w.close())
        applied.append(w.close())
        assert st.total_supply() == supply
    assert all(st.escrow(j) == 0 for j in st.jobs())
    assert replay(w.genesis, [{"records": [r.to_dict() for r in applied]}]).state_hash() \
        == st.state_hash()


def test_unused_helpers_match_record_types(world: World) -> None:
    """The testkit makes records of the kinds it claims (guards the fixtures above)."""
    assert isinstance(world.assign("j", "s", "e").typed_body(), InferenceAssigned)
    assert isinstance(world.commit("j", "s", "e").typed_body(), ArtifactBatchCommitted)


def test_genesis_from_network_config_is_accepted() -> None:
    """The genesis that gonka_hpc.config builds from the quickstart network loads as is."""
    from gonka_hpc.config import default_config_path, genesis, load_config

    cfg, _ = load_config(default_config_path())
    w = World()
    names = [*cfg.validator_names(), *(c.name for c in cfg.clients)]
    st = EpochState.from_genesis(genesis(cfg, {n: w.identity(n).public_hex for n in names}))
    assert [v["name"] for v in st.validators] == cfg.validator_names()
    assert st.balance("treasury") == cfg.treasury
    assert st.params["price_per_token"] == cfg.network.price_per_token
