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
from collections.abc import Callable, Sequence

import pytest

from gonka_hpc.canonical import canonical_bytes, canonical_hash, sha256_hex
from gonka_hpc.randomness import choose_executor, choose_verifier
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


def _from_scratch(world: World, records: Sequence[SignedRecord] = ()) -> EpochState:
    """Genesis, the four participants of the `state` fixture, then `records`: a state built
    without copies or cached digests, to compare copies with."""
    st = EpochState.from_genesis(world.genesis)
    for name, weight in (("ta", 10), ("exec-a", 10), ("exec-b", 20), ("ver", 5)):
        st.apply(world.join(name, weight))
    for rec in records:
        st.apply(rec)
    return st


@pytest.fixture
def state(world: World) -> EpochState:
    """Genesis plus four participants: the TA, two executors and a verifier."""
    return _from_scratch(world)


@pytest.fixture
def committed(world: World, state: EpochState) -> EpochState:
    """A job with one shard of two requests assigned to exec-a and committed (100 tokens)."""
    state.apply(world.job("j1"))
    state.apply(world.assign_to(state, "j1", "s1", "exec-a", 2))
    state.apply(world.commit("j1", "s1", "exec-a", n_tokens=100))
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


# --- blocks ---------------------------------------------------------------------------------------


def test_begin_block_records_block_hashes(world: World, state: EpochState) -> None:
    g = world.genesis_hash
    assert (state.height, state.block_hash(0), state.height_of(g)) == (0, g, 0)
    assert state.block_hash(1) is None and state.height_of("ab" * 32) is None
    state.begin_block(1, g)
    assert state.height == 1 and state.block_hash(1) is None  # not final until block 2 begins
    state.begin_block(2, "b1" * 32)
    assert (state.block_hash(1), state.height_of("b1" * 32)) == ("b1" * 32, 1)
    assert state.latest_block_hash() == "b1" * 32
    state.apply(world.join("late", 3))
    assert state.participant("late").join_height == 2
    assert state.participant("ta").join_height == 0
    assert state.weights_at(1) == {"exec-a": 10, "exec-b": 20, "ta": 10, "ver": 5}
    assert state.weights_at(2)["late"] == 3


@pytest.mark.parametrize("height,prev,pattern", [
    (2, "b1" * 32, "does not follow height 0"),
    (1, "ab" * 32, "is not the genesis hash"),
])
def test_begin_block_refuses_a_bad_link(world: World, state: EpochState, height: int,
                                        prev: str, pattern: str) -> None:
    before = state.state_hash()
    with pytest.raises(InvalidRecord, match=pattern):
        state.begin_block(height, prev)
    assert state.state_hash() == before


def test_begin_block_refuses_a_reused_hash(world: World, state: EpochState) -> None:
    state.begin_block(1, world.genesis_hash)
    state.begin_block(2, "b1" * 32)
    before = state.state_hash()
    with pytest.raises(InvalidRecord, match="already the hash of block 1"):
        state.begin_block(3, "b1" * 32)
    assert state.state_hash() == before


# --- inference_assigned ------------------------------------------------------------------------------


def test_assign_good(world: World, state: EpochState) -> None:
    state.apply(world.job("j1"))
    a = world.assign_to(state, "j1", "s1", "exec-a", 2)
    state.apply(a)
    state.apply(world.assign_to(state, "j1", "s2", "exec-b", 1, max_tokens_total=100))
    b = state.batch("j1", "s2")
    assert (b.executor, b.committed, b.max_tokens_total) == ("exec-b", False, 100)
    assert len(b.request_ids) == 1 and b.request_ids[0].startswith("j1:")
    assert b.block_hash == world.genesis_hash
    ta_weights = {"exec-a": 10, "exec-b": 20, "ta": 10, "ver": 5}
    for rid in state.batch("j1", "s1").request_ids:
        assert choose_executor(world.genesis_hash, rid, "ta", ta_weights) == "exec-a"


def test_assign_unknown_job(world: World, state: EpochState) -> None:
    rejects(state, world.assign("nope", "s1", "exec-a"), "unknown job 'nope'")


def test_assign_not_by_ta(world: World, state: EpochState) -> None:
    state.apply(world.job("j1"))
    rejects(state, world.assign("j1", "s1", "exec-b", ta="exec-a"),
            "must be signed by its ta 'ta', not 'exec-a'")


def test_assign_executor_not_participant(world: World, state: EpochState) -> None:
    state.apply(world.job("j1"))
    # Permanent: the executor is drawn from the participants final at block_hash.
    rejects(state, world.assign("j1", "s1", "alice"), "executor 'alice' is not a participant",
            permanent=True)


def test_assign_executor_is_ta(world: World, state: EpochState) -> None:
    state.apply(world.job("j1"))
    rejects(state, world.assign("j1", "s1", "ta"), "never executes its own jobs")


def test_assign_duplicate_shard(world: World, state: EpochState) -> None:
    state.apply(world.job("j1"))
    state.apply(world.assign_to(state, "j1", "s1", "exec-a", 1))
    rejects(state, world.assign("j1", "s1", "exec-b", ("j1:90",)), "already assigned",
            permanent=True)


def test_assign_duplicate_request_ids(world: World, state: EpochState) -> None:
    state.apply(world.job("j1"))
    state.apply(world.assign_to(state, "j1", "s1", "exec-a", 2))
    r1 = state.batch("j1", "s1").request_ids[1]
    rejects(state, world.assign("j1", "s2", "exec-b", (r1, "j1:99")),
            rf"request ids already assigned in job 'j1': \['{r1}'\]")
    rejects(state, world.assign("j1", "s3", "exec-b", ("j1:5", "j1:5")), "duplicate request ids")


@pytest.mark.parametrize("rids", [("j2:0",), ("j10:0",), ("j1",), ("r0", "j1:1")])
def test_assign_request_ids_must_belong_to_the_job(world: World, state: EpochState,
                                                   rids: tuple[str, ...]) -> None:
    state.apply(world.job("j1"))
    rejects(state, world.assign("j1", "s1", "exec-a", rids), "must start with 'j1:'",
            permanent=True)


def test_assign_no_more_requests_than_the_job_has(world: World, state: EpochState) -> None:
    state.apply(world.job("j1", n_requests=3))
    state.apply(world.assign_to(state, "j1", "s1", "exec-a", 2))
    rejects(state, world.assign_to(state, "j1", "s2", "exec-b", 2),
            "would have 4 assigned requests, more than its n_requests 3", permanent=True)
    state.apply(world.assign_to(state, "j1", "s2", "exec-b", 1))  # exactly n_requests


def test_assign_block_hash_must_be_a_finalized_block(world: World, state: EpochState) -> None:
    state.apply(world.job("j1"))
    rid = world.request_ids_for(state, "j1", "exec-a", 1)
    rejects(state, world.assign("j1", "s1", "exec-a", rid, block_hash="ab" * 32),
            "block_hash abababab.* is not the hash of a finalized block", permanent=True)
    world.next_block(state)
    # Block 1 is not final while its own records are applied: its hash is unknown.
    rejects(state, world.assign("j1", "s1", "exec-a", rid, block_hash=_fake_block_hash(1)),
            "is not the hash of a finalized block")
    world.next_block(state)
    state.apply(world.assign_to(state, "j1", "s1", "exec-a", 1,
                                block_hash=_fake_block_hash(1)))
    assert state.batch("j1", "s1").block_hash == state.block_hash(1)


def _fake_block_hash(height: int) -> str:
    """The prev hash `World.next_block` gives block `height` + 1."""
    return sha256_hex(f"block:{height}".encode())


def test_assign_executor_must_be_the_drawn_one(world: World, state: EpochState) -> None:
    state.apply(world.job("j1"))
    rids = world.request_ids_for(state, "j1", "exec-a", 2)
    rejects(state, world.assign("j1", "s1", "exec-b", rids),
            f"request '{rids[0]}' belongs to executor 'exec-a' .*not 'exec-b'", permanent=True)
    # One stray request is enough to refuse the shard.
    mixed = (*rids[:1], *world.request_ids_for(state, "j1", "exec-b", 1))
    rejects(state, world.assign("j1", "s1", "exec-a", mixed), "belongs to executor 'exec-b'")
    state.apply(world.assign("j1", "s1", "exec-a", rids))


def test_assign_draws_from_participants_final_at_the_block(world: World,
                                                           state: EpochState) -> None:
    """A participant that joined after block_hash is not a candidate, however heavy."""
    state.apply(world.job("j1"))
    world.next_block(state)  # block 1
    state.apply(world.join("whale", 1_000_000))
    world.next_block(state)  # block 2: block 1 (with whale) is final
    rid = world.request_ids_for(state, "j1", "whale", 1, block_hash=state.block_hash(1))
    # Drawn from genesis (before whale joined), the same request goes to someone else.
    rejects(state, world.assign("j1", "s1", "whale", rid, block_hash=world.genesis_hash),
            "belongs to executor '(ta|exec-a|exec-b|ver)'", permanent=True)
    state.apply(world.assign("j1", "s1", "whale", rid, block_hash=state.block_hash(1)))


def test_assign_nobody_to_draw(world: World) -> None:
    st = EpochState.from_genesis(world.genesis)
    st.apply(world.join("ta"))
    st.apply(world.job("j1"))
    world.next_block(st)
    st.apply(world.join("exec-a"))
    rejects(st, world.assign("j1", "s1", "exec-a"), "nobody can execute", permanent=True)


def test_assign_budget_must_fit_the_escrow(world: World, state: EpochState) -> None:
    state.apply(world.job("j1", escrow=10_000))  # price 10: 1,000 tokens in all
    state.apply(world.assign_to(state, "j1", "s1", "exec-a", 1, max_tokens_total=600))
    rejects(state, world.assign_to(state, "j1", "s2", "exec-b", 1, max_tokens_total=401),
            r"may bill 10010 units \(Σ max_tokens_total × price\), more than the escrow 10000",
            permanent=True)
    rejects(state, world.assign_to(state, "j1", "s2", "exec-b", 1, max_tokens_total=-1),
            "max_tokens_total must be >= 0", permanent=True)
    state.apply(world.assign_to(state, "j1", "s2", "exec-b", 1, max_tokens_total=400))


# --- artifact_batch_committed --------------------------------------------------------------------------


def test_commit_good(world: World, committed: EpochState) -> None:
    b = committed.batch("j1", "s1")
    assert b.committed and b.n_tokens == 100 and b.merkle_root == world.merkle_root("j1", "s1")
    assert b.commit_height == 0 and b.sample_block == world.genesis_hash


def test_commit_signer_not_executor(world: World, state: EpochState) -> None:
    state.apply(world.job("j1"))
    state.apply(world.assign_to(state, "j1", "s1", "exec-a"))
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
    state.apply(world.assign_to(state, "j1", "s1", "exec-a", 2))
    rejects(state, world.commit("j1", "s1", "exec-a", n_requests=3),
            "n_requests 3, shard was assigned 2")


def test_commit_over_the_shard_budget(world: World, state: EpochState) -> None:
    state.apply(world.job("j1", escrow=1_500))  # price 10: 150 tokens in all
    state.apply(world.assign_to(state, "j1", "s1", "exec-a", 2, max_tokens_total=100))
    state.apply(world.assign_to(state, "j1", "s2", "exec-b", 2, max_tokens_total=50))
    state.apply(world.commit("j1", "s1", "exec-a", n_tokens=100))
    rejects(state, world.commit("j1", "s2", "exec-b", n_tokens=51),
            "n_tokens 51, more than the shard's max_tokens_total 50", permanent=True)
    rejects(state, world.commit("j1", "s2", "exec-b", n_tokens=-1), "n_tokens must be >= 0")
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


def _other_verifier(state: EpochState, job_id: str, shard_id: str) -> str:
    """A participant who is neither the batch's executor nor its assigned verifier."""
    _, verifier = state.verification_duty(job_id, shard_id)
    ex = state.batch(job_id, shard_id).executor
    return next(p for p in state.participants() if p not in (verifier, ex))


def test_verdict_good(world: World, committed: EpochState) -> None:
    sample, verifier = committed.verification_duty("j1", "s1")
    assert sample == world.genesis_hash  # the commit is at height 0 (no block begun)
    weights = {"exec-a": 10, "exec-b": 20, "ta": 10, "ver": 5}
    assert verifier == choose_verifier(sample, "s1", "exec-a", weights)
    committed.apply(world.judge(committed, "j1", "s1", passed=True))
    assert committed.batch("j1", "s1").verdicts == {verifier: True}


def test_verification_duty_errors(world: World, state: EpochState) -> None:
    with pytest.raises(InvalidRecord, match="unknown job"):
        state.verification_duty("j1", "s1")
    state.apply(world.job("j1"))
    state.apply(world.assign_to(state, "j1", "s1", "exec-a"))
    with pytest.raises(InvalidRecord, match="not committed yet"):
        state.verification_duty("j1", "s1")
    with pytest.raises(InvalidRecord, match="unknown shard"):
        state.verification_duty("j1", "s9")


def test_verdict_by_executor(world: World, committed: EpochState) -> None:
    rejects(committed, world.verdict("exec-a", "j1", "s1", "exec-a"), "cannot judge its own")


def test_verdict_by_non_participant(world: World, committed: EpochState) -> None:
    rejects(committed, world.verdict("alice", "j1", "s1", "exec-a"),
            "verifier 'alice' is not a participant")


def test_verdict_before_commit_stays_pending(world: World, state: EpochState) -> None:
    state.apply(world.job("j1"))
    state.apply(world.assign_to(state, "j1", "s1", "exec-a"))
    world.next_block(state)  # block 1 holds the commit
    weights = state.weights_at(1)
    sample = _fake_block_hash(1)  # what block 1's hash will turn out to be
    verifier = choose_verifier(sample, "s1", "exec-a", weights)
    v = world.verdict(verifier, "j1", "s1", "exec-a", sample_block=sample)
    rejects(state, v, "not committed yet", permanent=False)
    state.apply(world.commit("j1", "s1", "exec-a"))
    # Committed, but block 1 is not final: its hash (the sample block) is not known yet.
    rejects(state, v, "sample block of shard 's1' .*block 1.* is not final yet",
            permanent=False)
    with pytest.raises(InvalidRecord, match="not final yet"):
        state.verification_duty("j1", "s1")
    world.next_block(state)
    assert state.verification_duty("j1", "s1") == (sample, verifier)
    state.apply(v)  # the same record is valid once the sample block is known


def test_verdict_wrong_root(world: World, committed: EpochState) -> None:
    good = world.judge(committed, "j1", "s1").typed_body()
    rec = sign_record(world.identity(good_signer(committed)),
                      Verdict(**{**good.__dict__, "merkle_root": "ab" * 32}))
    rejects(committed, rec, "merkle_root does not match", permanent=True)


def good_signer(state: EpochState, job_id: str = "j1", shard_id: str = "s1") -> str:
    return state.verification_duty(job_id, shard_id)[1]


def test_verdict_wrong_executor(world: World, committed: EpochState) -> None:
    rejects(committed, world.verdict(good_signer(committed), "j1", "s1", "exec-b"),
            "shard's executor is 'exec-a'")


def test_verdict_wrong_sample_block(world: World, committed: EpochState) -> None:
    rejects(committed, world.verdict(good_signer(committed), "j1", "s1", "exec-a",
                                     sample_block="ab" * 32),
            "sample_block abababab.* is not .*, the hash of block 0 that holds the commit",
            permanent=True)


def test_verdict_by_another_than_the_assigned_verifier(world: World,
                                                      committed: EpochState) -> None:
    sample, verifier = committed.verification_duty("j1", "s1")
    other = _other_verifier(committed, "j1", "s1")
    rejects(committed, world.verdict(other, "j1", "s1", "exec-a", sample_block=sample),
            f"'{other}' is not the assigned verifier of shard 's1' of job 'j1': block 0 "
            f"assigns '{verifier}'", permanent=True)


def test_verdict_twice_by_same_verifier(world: World, committed: EpochState) -> None:
    committed.apply(world.judge(committed, "j1", "s1", passed=True))
    rejects(committed, world.judge(committed, "j1", "s1", passed=False),
            f"'{good_signer(committed)}' already judged", permanent=True)


@pytest.mark.parametrize("checked,failed,passed,pattern", [
    (1, 2, False, r"need 0 <= failed \(2\) <= checked \(1\) <= the batch's n_requests \(2\)"),
    (3, 0, True, r"checked \(3\) <= the batch's n_requests \(2\)"),
    (2, -1, True, r"0 <= failed \(-1\)"),
    (2, 1, True, "passed=True with failed=1: passed must be"),
    (2, 0, False, "passed=False with failed=0"),
    (1, 0, True, "reputation 0: all 2 requests must be checked, the verdict checked 1"),
    (0, 0, True, "reputation 0: all 2 requests must be checked"),
])
def test_verdict_counts_must_be_consistent(world: World, committed: EpochState, checked: int,
                                          failed: int, passed: bool, pattern: str) -> None:
    rec = world.judge(committed, "j1", "s1", passed=passed, checked=checked, failed=failed)
    rejects(committed, rec, pattern, permanent=True)


@pytest.mark.parametrize("failed", [0, 1, 2])
def test_verdict_counts_good(world: World, committed: EpochState, failed: int) -> None:
    committed.apply(world.judge(committed, "j1", "s1", passed=failed == 0, failed=failed))
    assert committed.batch("j1", "s1").verdicts == {good_signer(committed): failed == 0}


def test_verdict_sample_of_a_trusted_executor(world: World, committed: EpochState) -> None:
    """A trusted executor (reputation > 0) may be checked on a sample only. Reputation only
    grows at epoch_close, so the state is set by hand here."""
    committed._participants["exec-a"]["reputation"] = 3
    committed.apply(world.judge(committed, "j1", "s1", passed=True, checked=1))
    assert committed.batch("j1", "s1").verdicts == {good_signer(committed): True}


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


def _epoch(w: World, st: EpochState, steps: list) -> None:  # type: ignore[type-arg]
    """Apply records, or record makers (callables of the state), in order."""
    for step in steps:
        st.apply(step if isinstance(step, SignedRecord) else step(st))


def test_settlement_cheater_forfeits_and_clients_are_refunded(world: World,
                                                              state: EpochState) -> None:
    w = world
    _epoch(w, state, [
        w.job("j1", client="alice", escrow=10_000),
        w.job("j2", client="bob", escrow=5_000),
        lambda st: w.assign_to(st, "j1", "s1", "exec-a", 1),
        lambda st: w.assign_to(st, "j1", "s2", "exec-b", 1),
        lambda st: w.assign_to(st, "j2", "s3", "exec-b", 1),
        w.commit("j1", "s1", "exec-a", n_tokens=100, n_requests=1),
        w.commit("j1", "s2", "exec-b", n_tokens=200, n_requests=1),
        w.commit("j2", "s3", "exec-b", n_tokens=100, n_requests=1),
        lambda st: w.judge(st, "j1", "s1", passed=True),
        lambda st: w.judge(st, "j1", "s2", passed=False),  # exec-b is accused
        lambda st: w.judge(st, "j2", "s3", passed=True),  # one pass does not save it
    ])
    _epoch(w, state, w.panel_votes(state, "j1", "s2", passed=False))  # and caught
    supply = state.total_supply()
    state.apply(w.close())
    s = state.settlement
    assert s is not None
    assert s["forfeited"] == ["exec-b"] and s["unverified"] == []
    # alice: 2,000 for the cheated batch + 7,000 unused; bob: all 5,000 back.
    assert s["refunds"] == {"alice": 2_000 + 7_000, "bob": 5_000}
    assert s["payments"] == {"exec-a": 1_000}
    assert s["subsidy"] == 100_000 and s["subsidy_shares"] == {"exec-a": 100_000}
    assert s["rewards"] == {"exec-a": 101_000}  # the only honest participant with work
    assert s["pool"] == 101_000 and s["returned_to_treasury"] == 0
    assert state.balance("alice") == 1_000_000 - 10_000 + 9_000
    assert state.balance("bob") == 50_000
    assert state.balance("exec-b") == 0
    assert state.balance("exec-a") == 101_000
    assert state.balance("treasury") == 1_000_000 - 100_000
    assert state.escrow("j1") == state.escrow("j2") == 0
    assert state.reputation("exec-b") == 0 and state.reputation("exec-a") == 1
    assert state.reputation("ver") == 0  # no work of its own
    assert state.total_supply() == supply


def test_settlement_pays_work_directly_and_shares_the_subsidy_by_weight_times_tokens() -> None:
    w = World(epoch_subsidy=100_001)
    st = EpochState.from_genesis(w.genesis)
    for name, weight in (("ta", 1), ("a", 10), ("c", 20), ("idle", 50)):
        st.apply(w.join(name, weight))
    _epoch(w, st, [
        w.job("j1"),
        lambda st: w.assign_to(st, "j1", "s1", "a", 1),
        lambda st: w.assign_to(st, "j1", "s2", "c", 1),
        w.commit("j1", "s1", "a", n_tokens=100, n_requests=1),
        w.commit("j1", "s2", "c", n_tokens=100, n_requests=1),
        lambda st: w.judge(st, "j1", "s1"),
        lambda st: w.judge(st, "j1", "s2"),
    ])
    st.apply(w.close())
    s = st.settlement
    assert s is not None
    # Each executor is paid exactly its own work: 100 tokens × price 10.
    assert s["payments"] == {"a": 1_000, "c": 1_000}
    # The subsidy goes by weight × verified tokens: a 10*100 = 1,000; c 20*100 = 2,000.
    assert s["subsidy_shares"] == {"a": 100_001 * 1_000 // 3_000, "c": 100_001 * 2_000 // 3_000}
    assert s["subsidy_shares"] == {"a": 33_333, "c": 66_667}
    assert s["rewards"] == {"a": 34_333, "c": 67_667}
    assert s["pool"] == 102_000
    assert s["returned_to_treasury"] == 1
    assert st.balance("treasury") == 1_000_000 - 100_001 + 1
    assert "idle" not in s["rewards"]
    assert st.reputations() == {"a": 1, "c": 1, "idle": 0, "ta": 0}
    assert st.balance("alice") == 1_000_000 - 2_000
    assert s["refunds"] == {"alice": 10_000 - 2_000}


def test_settlement_weight_never_takes_others_pay() -> None:
    """A participant declaring a huge weight gets a bigger share of the subsidy, never of the
    clients' payments for other executors' work (the old pool-by-weight rule allowed that)."""
    w = World(epoch_subsidy=0)
    st = EpochState.from_genesis(w.genesis)
    for name, weight in (("ta", 1), ("small", 1), ("whale", 1_000)):
        st.apply(w.join(name, weight))
    _epoch(w, st, [
        w.job("j1"),
        lambda st: w.assign_to(st, "j1", "s1", "small", 1),
        lambda st: w.assign_to(st, "j1", "s2", "whale", 1),
        w.commit("j1", "s1", "small", n_tokens=200, n_requests=1),
        w.commit("j1", "s2", "whale", n_tokens=1, n_requests=1),
        lambda st: w.judge(st, "j1", "s1"),
        lambda st: w.judge(st, "j1", "s2"),
    ])
    st.apply(w.close())
    s = st.settlement
    assert s is not None
    assert s["rewards"] == {"small": 2_000, "whale": 10}
    assert s["subsidy_shares"] == {} and s["pool"] == 2_010


def test_settlement_unverified_batches_are_refunded_not_paid(world: World,
                                                             state: EpochState) -> None:
    w = world
    _epoch(w, state, [
        w.job("j1", escrow=10_000),
        lambda st: w.assign_to(st, "j1", "s1", "exec-a", 1),
        lambda st: w.assign_to(st, "j1", "s2", "exec-b", 1),
        lambda st: w.assign_to(st, "j1", "s3", "exec-b", 1),
        w.commit("j1", "s1", "exec-a", n_tokens=100, n_requests=1),
        w.commit("j1", "s2", "exec-b", n_tokens=200, n_requests=1),  # never judged
        lambda st: w.judge(st, "j1", "s1"),
    ])  # s3 is never committed
    supply = state.total_supply()
    state.apply(w.close())
    s = state.settlement
    assert s is not None
    assert s["unverified"] == ["s2"] and s["forfeited"] == []
    assert s["payments"] == {"exec-a": 1_000}
    assert s["rewards"] == {"exec-a": 101_000}  # the whole subsidy: only verified work counts
    assert s["refunds"] == {"alice": 10_000 - 1_000}  # s2's 2,000 and the unused 7,000
    assert state.balance("exec-b") == 0
    assert state.reputation("exec-b") == 0  # not a cheater, but no passing verdict either
    assert state.reputation("exec-a") == 1
    assert state.total_supply() == supply


def test_settlement_subsidy_capped_by_treasury_and_no_honest_work() -> None:
    w = World(treasury=500, epoch_subsidy=100_000)
    st = EpochState.from_genesis(w.genesis)
    for name in ("ta", "x"):
        st.apply(w.join(name))
    _epoch(w, st, [
        w.job("j1", escrow=3_000),
        lambda st: w.assign_to(st, "j1", "s1", "x", 2),
        w.commit("j1", "s1", "x", n_tokens=100),
        lambda st: w.judge(st, "j1", "s1", passed=False),
    ])
    st.apply(w.close())
    s = st.settlement
    assert s is not None
    assert s["subsidy"] == 500 and s["pool"] == 0 and s["rewards"] == {}
    assert s["returned_to_treasury"] == 500  # no honest work: the subsidy stays
    assert st.balance("treasury") == 500
    assert st.balance("alice") == 1_000_000  # everything refunded
    assert s["forfeited"] == ["x"]


def test_settlement_empty_epoch(world: World) -> None:
    st = EpochState.from_genesis(world.genesis)
    st.apply(world.close())
    s = st.settlement
    assert s is not None and s["pool"] == 0 and s["rewards"] == {}
    assert s["subsidy"] == s["returned_to_treasury"] == 100_000
    assert st.balance("treasury") == 1_000_000


# --- replay and conservation -------------------------------------------------------------------------


def test_replay_matches_incremental(world: World) -> None:
    w = world
    st = EpochState.from_genesis(w.genesis)
    block1 = [w.join("ta"), w.join("exec-a")]
    st.begin_block(1, w.genesis_hash)
    for r in block1:
        st.apply(r)
    b1 = {"records": [r.to_dict() for r in block1]}
    st.begin_block(2, canonical_hash(b1))  # how replay hashes a bare {"records"} dict
    block2 = [w.job("j1")]
    st.apply(block2[0])
    block2.append(w.assign_to(st, "j1", "s1", "exec-a"))
    block2.append(w.commit("j1", "s1", "exec-a"))
    for r in block2[1:]:
        st.apply(r)
    b2 = {"records": [r.to_dict() for r in block2]}
    assert replay(w.genesis, [b1, b2]).state_hash() == st.state_hash()
    assert st.batch("j1", "s1").block_hash == canonical_hash(b1)
    with pytest.raises(InvalidRecord, match="block 2, record 0: record [0-9a-f]+ already applied"):
        replay(w.genesis, [{"records": b1["records"] + b2["records"][:1]},
                           {"records": b2["records"][:1]}])


def test_replay_turns_any_error_into_invalid_record(world: World,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    b1 = {"records": [world.join("ta").to_dict()]}
    garbage = {"records": [{"v": 1, "kind": "participant_joined", "signer": "x", "body": {
        "participant": "x", "pubkey": "ab", "weight": float("nan")}, "signature": "00" * 64}]}
    with pytest.raises(InvalidRecord, match="block 1: undecodable record.*non-finite"):
        replay(world.genesis, [garbage])

    def boom(self: EpochState, record: SignedRecord) -> None:
        raise RuntimeError("checker bug")

    monkeypatch.setattr(EpochState, "check", boom)
    with pytest.raises(InvalidRecord, match="block 1, record 0: RuntimeError: checker bug"):
        replay(world.genesis, [b1])


def _random_record(rng: random.Random, w: World, st: EpochState) -> SignedRecord:
    """A record that is often valid (built from the state) and often subtly not."""
    def pick(good: list[str], bad: list[str], p_good: float = 0.8) -> str:
        return rng.choice(good) if good and rng.random() < p_good else rng.choice(bad)

    parts = list(st.participants())
    batches = st.batches()
    committed = [b for b in batches if b.committed]
    kind = rng.choices(["join", "job", "assign", "commit", "verdict", "deliver", "close",
                        "forged"], weights=[2, 3, 5, 4, 5, 1, 1, 1])[0]
    if kind == "join":
        return w.join(rng.choice(["ta", "p1", "p2", "p3", "alice"]), rng.choice([0, 1, 5, 9]))
    if kind == "job":
        return w.job(f"j{rng.randrange(20)}", client=rng.choice(["alice", "bob", "p1"]),
                     ta=pick(parts, ["ta", "zed"]),
                     escrow=rng.choice([0, 100, 5_000, 5_000, 60_000]),
                     n_requests=rng.choice([1, 3, 6]))
    if kind == "assign":
        jobs = list(st.jobs())
        job = pick(jobs, ["j1", "nojob"])
        ta = st.job(job).ta if job in jobs and rng.random() < 0.9 else rng.choice(["ta", "p1"])
        shard = f"s{rng.randrange(6)}"
        budget = rng.choice([0, 10, 100, 250, 250, 3_000])
        hashes = [h for h in (st.block_hash(i) for i in range(st.height + 1)) if h]
        block_hash = rng.choice([hashes[-1], hashes[-1], rng.choice(hashes), "ab" * 32])
        executors = [p for p in parts if p != ta]
        if executors and rng.random() < 0.8:
            ex = rng.choice(executors)
            try:
                return w.assign_to(st, job, shard, ex, rng.randint(1, 2), ta=ta,
                                   max_tokens_total=budget, block_hash=block_hash)
            except (ValueError, KeyError):
                pass  # nobody to draw at that block, or an unknown hash: a raw one below
        rids = tuple(rng.sample([f"{job}:{i}" for i in range(8)] + ["r0"], rng.randint(1, 2)))
        return w.assign(job, shard, pick(parts, ["alice"]), rids, ta=ta,
                        max_tokens_total=budget, block_hash=block_hash)
    if kind == "commit":
        if batches and rng.random() < 0.85:
            b = rng.choice(batches)
            n_req = len(b.request_ids) if rng.random() < 0.9 else 7
            ex = b.executor if rng.random() < 0.9 else pick(parts, ["alice"])
            tokens = rng.choice([0, 10, b.max_tokens_total, b.max_tokens_total + 1, 200])
            return w.commit(b.job_id, b.shard_id, ex, n_tokens=tokens, n_requests=n_req)
        return w.commit("j1", "s1", pick(parts, ["alice"]))
    if kind == "verdict":
        if committed and rng.random() < 0.9:
            b = rng.choice(committed)
            n = len(b.request_ids)
            passed = rng.random() < 0.85
            failed = 0 if passed else rng.randint(1, max(n, 1))
            if rng.random() < 0.1:
                failed = rng.choice([0, 1, n + 1])  # sometimes inconsistent
            try:
                sample, verifier = st.verification_duty(b.job_id, b.shard_id)
            except InvalidRecord:
                sample, verifier = "cd" * 32, pick(parts, ["alice"])  # too early: pending
            if rng.random() < 0.1:
                verifier = pick(parts, ["alice"])
            return w.verdict(verifier, b.job_id, b.shard_id, b.executor, passed,
                             b.merkle_root, sample_block=sample,
                             checked=n if rng.random() < 0.9 else max(n - 1, 0), failed=failed)
        return w.verdict(pick(parts, ["alice"]), "j1", "s1", "p1")
    if kind == "deliver":
        jobs = list(st.jobs())
        job = pick(jobs, ["nojob"])
        return w.deliver(job, ta=st.job(job).ta if job in jobs else "ta")
    if kind == "close":
        return w.close(epoch=2)  # wrong epoch; the test closes epoch 1 at the end
    good = w.job(rng.choice(["j1", "j9"]))
    return SignedRecord(good.kind, good.signer, good.body, good.signature[:-2] + "00")


@pytest.mark.parametrize("seed", range(1, 11))
def test_money_is_conserved_over_random_sequences(seed: int) -> None:
    rng = random.Random(seed)
    print(f"seed {seed}")
    w = World(clients={"alice": 100_000, "bob": 20_000})
    st = EpochState.from_genesis(w.genesis)
    supply = st.total_supply()
    blocks: list[list[SignedRecord]] = [[]]
    st.begin_block(1, w.genesis_hash)
    kinds: dict[str, int] = {}
    for _ in range(400):
        if blocks[-1] and rng.random() < 0.08:  # the next block (never after an empty one)
            st.begin_block(len(blocks) + 1,
                           canonical_hash({"records": [r.to_dict() for r in blocks[-1]]}))
            blocks.append([])
            continue
        rec = _random_record(rng, w, st)
        before = st.state_hash()
        try:
            st.apply(rec)
        except InvalidRecord:
            assert st.state_hash() == before  # failure leaves the state unchanged
        else:
            blocks[-1].append(rec)
            kinds[rec.kind] = kinds.get(rec.kind, 0) + 1
        assert st.total_supply() == supply
        assert all(b >= 0 for b in st.balances().values())
        assert all(st.escrow(j) >= 0 for j in st.jobs())
        for job in st.jobs().values():  # what commits may bill never exceeds the escrow
            bs = [st.batch(job.job_id, s) for s in job.shards]
            assert sum(b.max_tokens_total for b in bs) * 10 <= job.escrowed
            assert sum(b.n_tokens for b in bs) * 10 <= job.escrowed
            assert sum(len(b.request_ids) for b in bs) <= job.n_requests
    # The generator makes enough valid records of every kind to mean something.
    assert sum(kinds.values()) >= 40, kinds
    assert all(kinds.get(k, 0) >= 2 for k in ("participant_joined", "job_accepted",
                                              "inference_assigned",
                                              "artifact_batch_committed", "verdict")), kinds
    # Closing at the end settles, and still conserves.
    escrowed = {j.job_id: j.escrow for j in st.jobs().values()}
    if not st.closed:
        close = w.close()
        st.apply(close)
        blocks[-1].append(close)
        assert st.total_supply() == supply
    assert all(st.escrow(j) == 0 for j in st.jobs())
    s = st.settlement
    assert s is not None
    assert sum(s["refunds"].values()) + sum(s["payments"].values()) == sum(escrowed.values())
    assert s["pool"] == sum(s["rewards"].values())
    assert s["subsidy"] == sum(s["subsidy_shares"].values()) + s["returned_to_treasury"]
    assert not set(s["rewards"]) & set(s["forfeited"])
    for b in st.batches():
        paid = (b.committed and b.executor not in s["forfeited"] and bool(b.verdicts)
                and b.dispute in (None, "pass"))
        assert (b.shard_id in s["unverified"]) >= (b.committed and not b.verdicts
                                                   and b.executor not in s["forfeited"])
        if paid:
            assert s["payments"].get(b.executor, 0) >= b.n_tokens * 10
    assert replay(w.genesis, [{"records": [r.to_dict() for r in blk]} for blk in blocks]) \
        .state_hash() == st.state_hash()


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


# --- copy-on-write copies and the digest state hash ------------------------------------------


def test_copy_on_write_keeps_copies_apart_and_hashes_agree(world: World,
                                                           state: EpochState) -> None:
    """Changes on a copy (commit, failing verdict, delivery) never reach the original nor
    the other way round, and the cached digest hash equals the hash of a state built from
    scratch with the same records (no copies, no cached digests)."""
    records = [world.job("j1"), world.job("j2")]
    for rec in records:
        state.apply(rec)
    for job, shard, ex in (("j1", "s1", "exec-a"), ("j1", "s2", "exec-b"), ("j2", "s1", "exec-a")):
        rec = world.assign_to(state, job, shard, ex, 2)
        state.apply(rec)
        records.append(rec)
    before_hash, before = state.state_hash(), state.snapshot()

    trial = state.copy()
    trial_records = [world.commit("j1", "s1", "exec-a", n_tokens=100)]
    trial.apply(trial_records[0])
    trial_records.append(world.judge(trial, "j1", "s1", passed=False))
    trial_records.append(world.deliver("j1"))
    for rec in trial_records[1:]:
        trial.apply(rec)
    assert state.snapshot() == before and state.state_hash() == before_hash
    assert trial.batch("j1", "s1").dispute == "open" and trial.job("j1").delivered
    assert state.batch("j1", "s1").committed is False and not state.job("j1").delivered

    # The original moves on its own way; the copy does not see it.
    other = world.commit("j1", "s1", "exec-a", n_tokens=7)
    state.apply(other)
    assert state.batch("j1", "s1").n_tokens == 7 and trial.batch("j1", "s1").n_tokens == 100
    assert not state.batch("j1", "s1").verdicts and trial.batch("j1", "s1").verdicts

    assert _from_scratch(world, records + trial_records).state_hash() == trial.state_hash()
    assert _from_scratch(world, records + [other]).state_hash() == state.state_hash()
    assert len({before_hash, trial.state_hash(), state.state_hash()}) == 3


def test_state_hash_covers_applied_order_and_every_shard(world: World, state: EpochState) -> None:
    """The applied-id chain depends on the order, and a change in any shard changes the hash."""
    a, b = state.copy(), state.copy()
    j1, j2 = world.job("j1"), world.job("j2", escrow=20_000)
    a.apply(j1)
    a.apply(j2)
    b.apply(j2)
    b.apply(j1)
    assert a.snapshot()["jobs"] == b.snapshot()["jobs"]
    assert a.state_hash() != b.state_hash()  # same records, other order: other history
    c = a.copy()
    c.apply(world.assign_to(c, "j2", "s1", "exec-a", 2))
    h = c.state_hash()
    assert h != a.state_hash()
    c2 = c.copy()
    c2.apply(world.commit("j2", "s1", "exec-a", n_tokens=1))
    assert c2.state_hash() != h and c.state_hash() == h


def test_copies_sharing_digest_caches_never_read_each_others_digests(
        world: World, state: EpochState) -> None:
    """Copies share the job, shard and request-id digest caches. Two copies that change the
    same job and shard differently (other executor and request ids, other token counts),
    hashed in turns, each hash exactly as a state built from scratch with its records."""
    base = [world.job("j1"), world.job("j2")]
    for rec in base:
        state.apply(rec)
    base.append(world.assign_to(state, "j2", "s1", "exec-a", 2))
    state.apply(base[-1])
    state.state_hash()  # fill the shared caches from the original
    a, b = state.copy(), state.copy()
    ra = [world.assign_to(a, "j1", "s1", "exec-a", 2)]
    rb = [world.assign_to(b, "j1", "s1", "exec-b", 3)]  # same shard key, other ids
    a.apply(ra[0])
    b.apply(rb[0])
    ha, hb = a.state_hash(), b.state_hash()
    assert ha != hb
    ra.append(world.commit("j1", "s1", "exec-a", n_tokens=5))
    rb.append(world.commit("j1", "s1", "exec-b", n_tokens=9, n_requests=3))
    for st, recs in ((a, ra), (b, rb)):
        st.apply(recs[-1])
        st.state_hash()  # each copy's entry replaces the other's under the same keys
    ra.append(world.commit("j2", "s1", "exec-a", n_tokens=11))
    a.apply(ra[-1])  # a changes a shard b still shares with the original

    def fresh(recs: list[SignedRecord]) -> str:
        return _from_scratch(world, recs).state_hash()

    for _ in range(2):  # in turns, twice: cached or not, the same answers
        assert b.state_hash() == fresh(base + rb)
        assert a.state_hash() == fresh(base + ra)
        assert state.state_hash() == fresh(base)
    c = a.copy()  # a copy of a copy, then a change in place on its own shard
    c.apply(world.judge(c, "j1", "s1", passed=True))
    assert a.state_hash() == fresh(base + ra) != c.state_hash()


def test_replay_protection_survives_many_copies(world: World, state: EpochState,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Applied ids live on in the frozen levels copies share: a record applied many copies
    ago is still refused as a replay, in the original line of copies and in side copies."""
    from ledger import layered_set

    monkeypatch.setattr(layered_set, "SEAL_AT", 2)
    first = world.job("j0")
    state.apply(first)
    st = state
    for i in range(1, 12):
        st = st.copy()
        st.apply(world.job(f"j{i}"))
    side = state.copy()
    for s in (st, side, state):
        with pytest.raises(InvalidRecord, match="replay"):
            s.apply(first)
    assert st.n_applied == state.n_applied + 11
    with pytest.raises(InvalidRecord, match="replay"):
        side.copy().apply(world.job("j0"))


@pytest.mark.parametrize("seed", range(6))
def test_random_copies_hash_like_states_built_from_scratch(
        seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Up to 8 states copied from one another at random, each applying random valid records
    (jobs, assignments, commits, verdicts, dispute votes, deliveries, close) and beginning
    blocks, hashed in random turns while they share digest caches and applied-id levels:
    every hash, snapshot and applied count equals that of a state built from scratch with
    the same log. Job ids repeat across copies, so different objects compete for the same
    cache keys."""
    from ledger import layered_set

    monkeypatch.setattr(layered_set, "SEAL_AT", (1, 4)[seed % 2])
    rng = random.Random(seed)
    world = World(clients={"alice": 10_000_000, "bob": 5_000_000})
    parts = (("ta", 10), ("exec-a", 10), ("exec-b", 20), ("ver", 5), ("p1", 7), ("p2", 9))

    def rebuild(log: list[tuple[str, object]]) -> EpochState:
        st = EpochState.from_genesis(world.genesis)
        for kind, x in log:
            if kind == "block":
                st.begin_block(*x)  # type: ignore[misc]
            else:
                st.apply(x)  # type: ignore[arg-type]
        return st

    def candidates(st: EpochState) -> list[Callable[[], SignedRecord]]:
        out: list[Callable[[], SignedRecord]] = [lambda: world.job(
            f"j{rng.randrange(5)}", client=rng.choice(["alice", "bob"]),
            escrow=rng.choice([10_000, 20_000]), n_requests=8)]
        for j, info in st.jobs().items():
            out.append(lambda j=j: world.deliver(j))
            for sid in ("s0", "s1", "s2"):
                if sid not in info.shards:
                    out.append(lambda j=j, sid=sid: world.assign_to(
                        st, j, sid, rng.choice(["exec-a", "exec-b", "p1", "p2"]),
                        rng.choice([1, 2]), max_tokens_total=rng.choice([100, 200])))
                elif not (b := st.batch(j, sid)).committed:
                    out.append(lambda j=j, sid=sid, b=b: world.commit(
                        j, sid, b.executor, n_tokens=rng.randrange(100),
                        n_requests=len(b.request_ids)))
                else:
                    out.append(lambda j=j, sid=sid: world.judge(
                        st, j, sid, passed=rng.random() < 0.5))
                    out.append(lambda j=j, sid=sid: world.vote(
                        st, j, sid, rng.choice([n for n, _ in parts]),
                        passed=rng.random() < 0.5))
        return out

    first = EpochState.from_genesis(world.genesis)
    first_log: list[tuple[str, object]] = []
    for name, weight in parts:
        first_log.append(("record", world.join(name, weight)))
        first.apply(first_log[-1][1])  # type: ignore[arg-type]
    pool = [(first, first_log)]
    kinds: set[str] = set()
    checks = 0
    for _ in range(300):
        st, log = rng.choice(pool)
        op = rng.random()
        if op < 0.2:
            pool.append((st.copy(), list(log)))
            if len(pool) > 8:
                pool.pop(rng.randrange(len(pool)))
        elif op < 0.3:
            h = st.height + 1
            blk = (h, st.genesis_hash if h == 1 else f"{rng.getrandbits(64):016x}" * 4)
            st.begin_block(*blk)
            log.append(("block", blk))
        elif op < 0.75:
            for _ in range(5):
                try:
                    rec = (rng.choice(candidates(st)) if rng.random() > 0.02
                           else world.close)()
                    st.apply(rec)
                except (InvalidRecord, ValueError, KeyError):
                    continue
                log.append(("record", rec))
                kinds.add(rec.kind)
                break
        else:
            for st2, log2 in rng.sample(pool, min(len(pool), 3)):
                ref = rebuild(log2)
                assert st2.state_hash() == ref.state_hash()
                assert st2.snapshot() == ref.snapshot()
                assert st2.n_applied == ref.n_applied
                checks += 1
    for st2, log2 in pool:
        assert st2.state_hash() == rebuild(log2).state_hash()
        assert all(st2.has_applied(x.record_id) for k, x in log2  # type: ignore[attr-defined]
                   if k == "record")
    assert checks > 20 and {"inference_assigned", "artifact_batch_committed"} <= kinds
