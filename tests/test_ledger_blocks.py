"""Every validator checks each block itself (`check_block`): blocks that break the rules are
refused whole, whoever proposed them and however they are signed; and the equivocation
evidence record (`equivocation_evidence`) is checked like any other record.

The blocks are built by hand on top of a real state: a job whose escrow the client does not
have (unescrowed funds), a second epoch_close in one block and across blocks (settling
twice), records from an account that never joined (an unknown participant), and the same
record twice (replay) within a block and in a later block. Each must raise InvalidBlock
naming the record, and leave the state before it untouched.
"""

from __future__ import annotations

import pytest

from gonka_hpc.records import EquivocationEvidence, SignedRecord, sign_record
from ledger.block import Block, InvalidBlock, check_block, check_certificate, sign_precommit
from ledger.proposer import proposer_index
from ledger.state import EpochState, InvalidRecord
from ledger.testkit import World
from ledger.votes import NIL, vote_bytes


@pytest.fixture
def world() -> World:
    return World(n_validators=4, clients={"alice": 50_000})


def _block(state: EpochState, records: list[SignedRecord], *, height: int | None = None,
           prev: str | None = None, state_hash: str | None = None) -> Block:
    """A block of `records` as an honest proposer would build it: the state hash is the one
    the records give when they apply (or a stand-in when they do not)."""
    height = state.height + 1 if height is None else height
    prev = prev or (state.genesis_hash if height == 1 else "ab" * 32)
    trial = state.copy()
    trial.begin_block(height, prev)
    try:
        for r in records:
            trial.apply(r)
        got = trial.state_hash()
    except InvalidRecord:
        got = "00" * 32
    vals = state.validators
    return Block(height, 0, prev, vals[proposer_index(vals, height, 0)]["name"],
                 tuple(r.to_dict() for r in records), state_hash or got)


def _after(world: World, *blocks: list[SignedRecord]) -> tuple[EpochState, str]:
    """The state after committing `blocks` in order, and the last block's hash."""
    state = EpochState.from_genesis(world.genesis)
    prev = state.genesis_hash
    for records in blocks:
        b = _block(state, records, prev=prev)
        state = check_block(state, b, height=state.height + 1, prev=prev)
        prev = b.hash
    return state, prev


def _refused(state: EpochState, block: Block, prev: str, *words: str) -> None:
    before = state.state_hash()
    with pytest.raises(InvalidBlock) as exc:
        check_block(state, block, height=state.height + 1, prev=prev)
    for w in words:
        assert w in exc.value.reason, exc.value.reason
    assert state.state_hash() == before


def test_a_block_spending_unescrowed_funds_is_refused(world: World) -> None:
    state, prev = _after(world, [world.join("ta")])
    rich = world.job("j1", escrow=60_000)  # alice holds 50,000
    _refused(state, _block(state, [rich], prev=prev), prev, "record 0", "exceeds the balance")
    # Two jobs that each fit, but not together: the second spends what is already escrowed.
    a, b = world.job("j1", escrow=30_000), world.job("j2", escrow=30_000)
    _refused(state, _block(state, [a, b], prev=prev), prev, "record 1", "exceeds the balance")


def test_a_block_that_settles_twice_is_refused(world: World) -> None:
    state, prev = _after(world, [world.join("ta")])
    _refused(state, _block(state, [world.close(0), world.close(1)], prev=prev), prev,
             "record 1", "closed")
    closed, prev2 = _after(world, [world.join("ta")], [world.close(0)])
    _refused(closed, _block(closed, [world.close(2)], prev=prev2), prev2, "record 0", "closed")


def test_a_block_with_records_of_an_unknown_participant_is_refused(world: World) -> None:
    state, prev = _after(world, [world.join("ta")])
    stranger = world.job("j1", ta="mallory")  # mallory never joined
    _refused(state, _block(state, [stranger], prev=prev), prev, "record 0", "mallory")
    ghost = world.commit("j9", "s1", "exec-ghost")  # an executor nobody knows, a job nobody has
    _refused(state, _block(state, [ghost], prev=prev), prev, "record 0")


def test_a_record_cannot_be_included_twice(world: World) -> None:
    join = world.join("ta")
    state, prev = _after(world, [join])
    _refused(state, _block(state, [join], prev=prev), prev, "record 0", "replay")
    fresh = EpochState.from_genesis(world.genesis)
    twice = _block(fresh, [world.join("x"), world.join("x")])
    _refused(fresh, twice, fresh.genesis_hash, "record 1", "replay")


def test_a_block_with_a_wrong_state_hash_or_proposer_is_refused(world: World) -> None:
    state = EpochState.from_genesis(world.genesis)
    g = state.genesis_hash
    _refused(state, _block(state, [world.join("ta")], state_hash="cd" * 32), g, "state_hash")
    good = _block(state, [world.join("ta")])
    wrong = Block(good.height, good.round, good.prev, "validator-3", good.records,
                  good.state_hash)
    _refused(state, wrong, g, "proposer 'validator-3'")


def test_a_certificate_must_come_from_one_round(world: World) -> None:
    state = EpochState.from_genesis(world.genesis)
    block = _block(state, [world.join("ta")])
    vals = world.genesis["validators"]
    same = [sign_precommit(world.identity(f"validator-{i}"), i, block, 2) for i in range(3)]
    check_certificate(vals, block, same)
    assert all(v["round"] == 2 for v in same)
    mixed = [sign_precommit(world.identity(f"validator-{i}"), i, block, 2 if i else 1)
             for i in range(3)]
    with pytest.raises(InvalidBlock, match="different rounds"):
        check_certificate(vals, block, mixed)
    redundant = [dict(v, round=0) for v in
                 (sign_precommit(world.identity(f"validator-{i}"), i, block) for i in range(3))]
    with pytest.raises(InvalidBlock):
        check_certificate(vals, block, redundant)  # round is named only when it differs


# --- equivocation evidence ------------------------------------------------------------------


def _evidence(world: World, reporter: str = "validator-0", accused: str = "validator-2",
              step: str = "prevote", a: str = "ab" * 32, b: str = NIL,
              signer_of_b: str | None = None) -> SignedRecord:
    acc = world.identity(accused)
    sig_a = acc.sign(vote_bytes(step, 3, 1, a))
    sig_b = world.identity(signer_of_b or accused).sign(vote_bytes(step, 3, 1, b))
    return sign_record(world.identity(reporter), EquivocationEvidence(
        accused, 3, 1, step, a, sig_a, b, sig_b))


def test_equivocation_evidence_is_recorded_once_per_offence(world: World) -> None:
    state = EpochState.from_genesis(world.genesis)
    state.apply(_evidence(world))
    assert state.equivocations() == {"validator-2/3/1/prevote": "validator-0"}
    with pytest.raises(InvalidRecord, match="already on record") as exc:
        state.apply(_evidence(world, reporter="validator-1"))
    assert exc.value.permanent
    state.apply(_evidence(world, step="precommit"))  # another step: another offence
    assert len(state.equivocations()) == 2


@pytest.mark.parametrize("kwargs, words", [
    ({"reporter": "alice"}, "not a genesis validator"),
    ({"accused": "alice"}, "not a genesis validator"),
    ({"b": "ab" * 32}, "same block hash"),
    ({"signer_of_b": "validator-3"}, "not signed by 'validator-2'"),
    ({"step": "propose"}, "names no vote"),
])
def test_bad_equivocation_evidence_is_refused_for_good(world: World, kwargs: dict[str, str],
                                                       words: str) -> None:
    if kwargs.get("step") == "propose":
        acc = world.identity("validator-2")
        sig = acc.sign(b"not a vote")
        rec = sign_record(world.identity("validator-0"), EquivocationEvidence(
            "validator-2", 3, 1, "propose", "ab" * 32, sig, NIL, sig))
    elif "accused" in kwargs:
        acc = world.identity("alice")
        rec = sign_record(world.identity("validator-0"), EquivocationEvidence(
            "alice", 3, 1, "prevote", "ab" * 32, acc.sign(vote_bytes("prevote", 3, 1, "ab" * 32)),
            NIL, acc.sign(vote_bytes("prevote", 3, 1, NIL))))
    else:
        rec = _evidence(world, **kwargs)
    state = EpochState.from_genesis(world.genesis)
    with pytest.raises(InvalidRecord) as exc:
        state.apply(rec)
    assert words in exc.value.reason and exc.value.permanent


# --- blocks from record bytes, and cut back into records (the fast path) -------------------------


def _tricky_records(world: World) -> list[SignedRecord]:
    """Records whose bytes need care: non-ASCII and escaped strings, a float in evidence, a
    body string that looks like the signature key."""
    from gonka_hpc.records import DisputeVote, Verdict, evidence_digest

    v = world.identity("validator-1")
    ev = {"note": 'quote " and \\ back\u00e9 \u2028', "x": 1e-07, "n": [1, 2.5]}
    return [world.join("ta"), world.commit("j", "s0", "exec"),
            sign_record(v, Verdict("j", "s1", "exec", "ab" * 32, ',"signature":"' + "1" * 128,
                                   2, 0, True, ev)),
            sign_record(v, DisputeVote("j\u00e9", "s2", "exec", "cd" * 32, "ef" * 32, "01" * 32,
                                       2, 1, False, evidence_digest(ev), ev))]


def test_a_block_of_record_bytes_is_its_canonical_encoding(world: World) -> None:
    from gonka_hpc.canonical import canonical_bytes, sha256_hex

    records = [SignedRecord.decode(r.encode()) for r in _tricky_records(world)]
    block = Block.of_records(7, 2, "ab" * 32, "validator-\u00e9", records, "cd" * 32)
    assert block.encode() == canonical_bytes(block.to_dict())
    assert block.hash == sha256_hex(canonical_bytes(block.to_dict()))
    assert block.record_lengths == tuple(len(r.encode()) for r in records)
    # cut back into records by a peer: with and without holding the records already
    held = {r.record_id: r for r in records}
    for known in (held.get, lambda rid: None):
        parsed = Block.from_parts(block.encode(), block.record_lengths, known)
        assert parsed is not None
        got, recs, rids = parsed
        assert got == Block.from_canonical(block.encode()) and got.hash == block.hash
        assert rids == [r.record_id for r in records]
        assert [r.encode() for r in recs] == [r.encode() for r in records]
        assert [r.signing_bytes() for r in recs] == [r.signing_bytes() for r in records]
    assert Block.from_parts(block.encode(), block.record_lengths, held.get)[1][0] is records[0]


def test_a_wrong_length_hint_is_never_trusted(world: World) -> None:
    records = _tricky_records(world)
    block = Block.of_records(3, 0, "ab" * 32, "validator-3", records, "cd" * 32)
    raw, lengths = block.encode(), list(block.record_lengths or ())
    bad_hints = [None, [], "12", lengths[:-1], lengths + [5], [lengths[0] + 1] + lengths[1:],
                 [lengths[0] - 1, lengths[1] + 1] + lengths[2:], [-1] + lengths[1:],
                 [True] + lengths[1:], [sum(lengths) + len(lengths) - 1]]
    for hint in bad_hints:
        assert Block.from_parts(raw, hint, lambda rid: None) is None, hint
    # bytes that are not canonical are refused by both paths, whatever the hint
    loose = raw.replace(b'"round":0', b'"round": 0')
    assert Block.from_parts(loose, lengths, lambda rid: None) is None
    with pytest.raises(InvalidBlock):
        Block.from_canonical(loose)
    # a record whose bytes are not canonical (keys out of order) is not cut out either
    first = records[0].encode()
    swapped = b'{"v":1,' + first[1:-len(b',"v":1}')] + b"}"
    assert SignedRecord.decode(swapped).encode() == first
    raw2 = raw.replace(first, swapped)
    assert Block.from_parts(raw2, lengths, lambda rid: None) is None
    with pytest.raises(InvalidBlock):
        Block.from_canonical(raw2)


def test_a_block_cut_from_its_parts_is_checked_like_any_other(world: World) -> None:
    state = EpochState.from_genesis(world.genesis)
    records = [SignedRecord.decode(world.join(n).encode()) for n in ("ta", "exec")]
    trial = state.copy()
    trial.begin_block(1, state.genesis_hash)
    for r in records:
        trial.apply(r)
    vals = state.validators
    block = Block.of_records(1, 0, state.genesis_hash,
                             vals[proposer_index(vals, 1, 0)]["name"], records,
                             trial.state_hash())
    got, recs, _ = Block.from_parts(block.encode(), block.record_lengths, lambda rid: None)
    new = check_block(state, got, height=1, prev=state.genesis_hash, decoded=recs)
    assert new.state_hash() == block.state_hash == trial.state_hash()
    assert check_block(state, Block.from_canonical(block.encode()), height=1,
                       prev=state.genesis_hash).state_hash() == new.state_hash()
