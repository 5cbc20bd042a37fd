"""The validators over real MPI communicators (ledger/consensus.py).

Written once, run at every size: each test runs on COMM_SELF and on COMM_WORLD, whatever size
the suite was launched with (`mpiexec -n 4 python -m pytest --with-mpi -m mpi tests/`). Every
rank is validator `rank` of a genesis with `size` validators; all ranks must finalize the
same blocks with the same certificates, and quorum must follow the > 2/3 rule exactly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest

from gonka_hpc.canonical import canonical_hash
from ledger.block import Block, check_certificate, has_quorum, sign_precommit
from ledger.testkit import World

pytestmark = pytest.mark.mpi


def _comms() -> list[Any]:
    from mpi4py import MPI

    return [MPI.COMM_SELF, MPI.COMM_WORLD]


@contextlib.contextmanager
def _solo_validator(w: World) -> Iterator[Any]:
    """Validator 0 of `w`'s genesis on COMM_SELF, in a tmp dir of this rank's own (its keys,
    inbox, data): the driver's message handling without the other ranks."""
    import tempfile
    from pathlib import Path

    from mpi4py import MPI

    from ledger.consensus import RunConfig, Validator

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        w.save_validator_keys(root / "keys")
        (root / "inbox").mkdir()
        yield Validator(MPI.COMM_SELF, RunConfig(root / "genesis.json", root / "keys",
                                                 root / "data", root / "inbox"), w.genesis)


@pytest.mark.parametrize("which", ["self", "world"])
def test_sleepy_collectives_match_mpi(which: str) -> None:
    from ledger.consensus import allgather, bcast

    comm = _comms()[which == "world"]
    rank, size = comm.Get_rank(), comm.Get_size()
    for root in range(size):
        blob = bytes(range(256)) * (root + 1)  # raw bytes travel as a payload, not JSON
        got = bcast(comm, {"from": root, "data": list(range(root + 3))} if rank == root
                    else None, root, blob if rank == root else b"")
        assert got == ({"from": root, "data": list(range(root + 3))}, blob)
    assert allgather(comm, ["rank", rank]) == comm.allgather(["rank", rank])
    assert allgather(comm, rank * 10) == [r * 10 for r in range(size)]


@pytest.mark.parametrize("which", ["self", "world"])
def test_validators_decide_the_same_blocks_over_point_to_point_messages(which: str) -> None:
    """The whole validator (rounds, votes, certificates, stop) on a real communicator: every
    rank is validator `rank` of a genesis with `size` validators, with its own chain dir in a
    tmp dir rank 0 creates. Records and STOP are in the inbox from the start: the ranks must
    finalize all of them, then stop together, with the same blocks and certificates."""
    import shutil
    import tempfile
    from pathlib import Path

    from gonka_hpc.inbox import post
    from ledger.audit import audit_chain
    from ledger.chain import find_records, read_chain
    from ledger.consensus import STOP_FILE, RunConfig, Validator, bcast

    comm = _comms()[which == "world"]
    rank, size = comm.Get_rank(), comm.Get_size()
    w = World(n_validators=size, seed=f"p2p-{size}")
    root = Path(bcast(comm, tempfile.mkdtemp(prefix="ledger-p2p-") if rank == 0 else None,
                      0)[0])
    try:
        if rank == 0:
            w.save_validator_keys(root / "keys")
            (root / "inbox").mkdir()
            ids = [post(root / "inbox", w.join(f"p{i}", 1 + i)) for i in range(5)]
            (root / "inbox" / STOP_FILE).touch()
        ids = bcast(comm, ids if rank == 0 else None, 0)[0]
        cfg = RunConfig(root / "genesis.json", root / "keys", root / "data", root / "inbox",
                        interval=0.01)
        Validator(comm, cfg, w.genesis).run()
        mine = root / "data" / f"validator-{rank}"
        assert set(find_records(mine, ids)) == set(ids)
        lines = (mine / "chain.log").read_bytes()
        assert len(set(allgather_(comm, canonical_hash(lines.decode())))) == 1
        assert audit_chain(mine).height == len(read_chain(mine)) >= 1
    finally:
        comm.Barrier()
        if rank == 0:
            shutil.rmtree(root, ignore_errors=True)


def allgather_(comm: Any, obj: Any) -> list[Any]:
    from ledger.consensus import allgather

    return allgather(comm, obj)


def test_quorum_is_more_than_two_thirds_of_the_weight() -> None:
    w = World(n_validators=4)
    vals = [dict(v) for v in w.genesis["validators"]]
    assert not has_quorum(vals, [0, 1]) and has_quorum(vals, [0, 1, 2])
    vals[3]["weight"] = 5  # total 8: 5 + 1 = 6 > 16/3, but 1 + 1 + 1 = 3 is not
    assert has_quorum(vals, [3, 0]) and not has_quorum(vals, [0, 1, 2])
    block = Block(1, 0, canonical_hash(w.genesis), "validator-1", (), "0" * 64)
    votes = [sign_precommit(w.identity(f"validator-{i}"), i, block) for i in (0, 3)]
    check_certificate(vals, block, votes)


def test_propose_rejects_a_record_that_raises_anything(monkeypatch: pytest.MonkeyPatch) -> None:
    """A record whose check raises an unexpected exception (a checker bug) goes to rejected/
    with the reason; the records around it still make the block. One validator on COMM_SELF,
    in a directory of this rank's own."""
    from gonka_hpc.inbox import post
    from ledger.state import EpochState

    w = World(n_validators=1)
    with _solo_validator(w) as v:
        cfg = v.cfg
        ok1, bad, ok2 = w.join("a"), w.join("b"), w.join("c")
        for rec in (ok1, bad, ok2):
            post(cfg.inbox, rec)
        real_check = EpochState.check

        def check(self: EpochState, record: Any) -> Any:
            if record.record_id == bad.record_id:
                raise KeyError("checker bug")
            return real_check(self, record)

        monkeypatch.setattr(EpochState, "check", check)
        v.mempool.refresh()
        block = v.get_value(1, 0)
        assert block is not None
        assert [r["signer"] for r in block.records] == ["a", "c"]
        reason = (cfg.inbox / "rejected" / f"{bad.record_id}.json.reason").read_text()
        assert "participant_joined record could not be checked: KeyError" in reason
        monkeypatch.undo()
        # The block the proposer built is the one every voter computes.
        from ledger.block import check_block

        new = check_block(v.state, block, height=1, prev=canonical_hash(w.genesis))
        assert new.state_hash() == block.state_hash


def test_messages_for_future_heights_are_buffered_within_a_budget() -> None:
    """A peer can send messages for the next heights before we get there; they are kept for
    then, but only FUTURE_PROPOSALS proposals per sender and height, and
    FUTURE_VOTES_PER_VOTER votes of each voter per sender and height (a relayed vote is
    charged to its voter, so one Byzantine voter cannot use up what an honest relayer may
    send us). Messages for heights further ahead are not kept at all. One validator of four
    on COMM_SELF."""
    from ledger.consensus import FUTURE_PROPOSALS, FUTURE_VOTES_PER_VOTER
    from ledger.votes import NIL, PREVOTE

    w = World(n_validators=4)
    with _solo_validator(w) as v:
        sent: list[tuple[Any, int | None]] = []  # COMM_SELF has no ranks 1-3 to send to
        v.send = lambda msg, dest=None: sent.append((msg, dest))  # type: ignore[method-assign]
        h = v.machine.height
        cap = FUTURE_VOTES_PER_VOTER
        for r in range(cap + 50):  # rank 1 relays votes of validator 2, for many rounds
            v.handle(1, ("V", PREVOTE, h + 1, r, NIL, 2, "00" * 64))
        v.handle(1, ("V", PREVOTE, h + 1, 0, NIL, 1, "00" * 64))  # its own vote still fits
        v.handle(1, ("V", PREVOTE, h + 1, 0, NIL, 9, "00" * 64))  # no validator 9: dropped
        for r in range(10):
            v.handle(2, ("P", h + 1, r, b"{}", -1, 2, "00" * 64, None))
        v.handle(2, ("V", PREVOTE, h + 2, 0, NIL, 2, "00" * 64))
        v.handle(2, ("V", PREVOTE, h + 3, 0, NIL, 2, "00" * 64))  # too far ahead: dropped
        kept = v._future[h + 1]
        votes_from_1 = [m for src, m in kept if src == 1]
        assert [m[5] for m in votes_from_1].count(2) == cap
        assert [m[5] for m in votes_from_1].count(1) == 1
        assert all(m[5] in (1, 2) for m in votes_from_1)
        assert len([m for src, m in kept if src == 2 and m[0] == "P"]) == FUTURE_PROPOSALS
        assert len(v._future[h + 2]) == 1 and h + 3 not in v._future
        assert (("Q", v.chain.height), 2) in sent  # rank 2 is ahead: ask it for blocks


def test_a_late_second_vote_for_the_height_just_committed_is_still_evidence() -> None:
    """A validator that splits its votes can time the second half to arrive after the
    receiver committed the height. The votes counted at that height are kept until the
    next commit, so the late half still becomes an equivocation_evidence record in the
    inbox (once); a late vote that agrees, or one of another height, is no offence."""
    from gonka_hpc.records import SignedRecord
    from ledger.rounds import Vote, sign_vote
    from ledger.votes import NIL, PREVOTE

    w = World(n_validators=4)
    with _solo_validator(w) as v:
        cfg = v.cfg
        v.send = lambda msg, dest=None: None  # type: ignore[method-assign]
        h = v.machine.height
        v.machine.height = h + 1  # (as if height h had just been committed)
        byz = w.identity("validator-2")
        counted = sign_vote(byz, 2, PREVOTE, h, 0, "ab" * 32)
        v._last_votes = {(0, PREVOTE, 2): counted}

        def wire(x: Vote) -> tuple[object, ...]:
            return ("V", x.step, x.height, x.round, x.block_hash, x.index, x.signature)

        def evidence() -> list[SignedRecord]:
            recs = [SignedRecord.decode(p.read_bytes()) for p in cfg.inbox.glob("*.json")]
            return [r for r in recs if r.kind == "equivocation_evidence"]

        v.handle(1, wire(counted))  # the same vote again: nothing
        v.handle(1, wire(sign_vote(byz, 2, PREVOTE, h - 1, 0, NIL)))  # an older height
        forged = sign_vote(w.identity("validator-3"), 2, PREVOTE, h, 0, NIL)  # not byz's key
        v.handle(1, wire(forged))
        assert evidence() == []
        late = sign_vote(byz, 2, PREVOTE, h, 0, NIL)
        v.handle(3, wire(late))
        v.handle(1, wire(late))  # relayed again: still one record
        found = evidence()
        assert len(found) == 1
        body = found[0].typed_body()
        assert (body.validator, body.height, body.round, body.step) == ("validator-2", h, 0,
                                                                         PREVOTE)
        assert {body.block_hash_a, body.block_hash_b} == {"ab" * 32, NIL}
