"""Vote exchange and commit certificates over real MPI communicators (ledger/consensus.py).

Written once, run at every size: each test runs on COMM_SELF and on COMM_WORLD, whatever size
the suite was launched with (`mpiexec -n 4 python -m pytest --with-mpi -m mpi tests/`). Every
rank is validator `rank` of a genesis with `size` validators; all ranks must end with the
same certificate, and quorum must follow the > 2/3 rule exactly.
"""

from __future__ import annotations

from typing import Any

import pytest

from gonka_hpc.canonical import canonical_hash
from ledger.block import Block, check_certificate, has_quorum, sign_precommit
from ledger.testkit import World

pytestmark = pytest.mark.mpi


def _comms() -> list[Any]:
    from mpi4py import MPI

    return [MPI.COMM_SELF, MPI.COMM_WORLD]


@pytest.mark.parametrize("which", ["self", "world"])
def test_sleepy_collectives_match_mpi(which: str) -> None:
    from ledger.consensus import allgather, bcast

    comm = _comms()[which == "world"]
    rank, size = comm.Get_rank(), comm.Get_size()
    for root in range(size):
        got = bcast(comm, {"from": root, "data": list(range(root + 3))} if rank == root
                    else None, root)
        assert got == {"from": root, "data": list(range(root + 3))}
    assert allgather(comm, ("rank", rank)) == comm.allgather(("rank", rank))
    assert allgather(comm, rank * 10) == [r * 10 for r in range(size)]


@pytest.mark.parametrize("which", ["self", "world"])
@pytest.mark.parametrize("nil_every", [0, 2, 3])
def test_vote_exchange_builds_the_same_certificate_everywhere(which: str,
                                                              nil_every: int) -> None:
    from ledger.consensus import allgather, exchange_votes

    comm = _comms()[which == "world"]
    rank, size = comm.Get_rank(), comm.Get_size()
    w = World(n_validators=size)
    vals = w.genesis["validators"]
    block = Block(1, 0, canonical_hash(w.genesis), vals[1 % size]["name"], (), "0" * 64)
    votes_yes = nil_every == 0 or rank % nil_every != nil_every - 1
    vote = sign_precommit(w.identity(f"validator-{rank}"), rank, block) if votes_yes else None
    cert = exchange_votes(comm, vals, block, vote)
    expected = [i for i in range(size) if nil_every == 0 or i % nil_every != nil_every - 1]
    assert [c["index"] for c in cert] == expected
    assert len(set(allgather(comm, canonical_hash(cert)))) == 1  # identical on every rank
    quorum = 3 * len(expected) > 2 * size
    assert has_quorum(vals, [c["index"] for c in cert]) is quorum
    if quorum:
        check_certificate(vals, block, cert)


def test_propose_rejects_a_record_that_raises_anything(monkeypatch: pytest.MonkeyPatch) -> None:
    """A record whose check raises an unexpected exception (a checker bug) goes to rejected/
    with the reason; the records around it still make the block. One validator on COMM_SELF,
    in a directory of this rank's own."""
    import tempfile
    from pathlib import Path

    from mpi4py import MPI

    from gonka_hpc.inbox import post
    from ledger.consensus import RunConfig, Validator
    from ledger.state import EpochState

    w = World(n_validators=1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        w.save_validator_keys(root / "keys")
        (root / "inbox").mkdir()
        cfg = RunConfig(root / "genesis.json", root / "keys", root / "data", root / "inbox")
        v = Validator(MPI.COMM_SELF, cfg, w.genesis)
        ok1, bad, ok2 = w.join("a"), w.join("b"), w.join("c")
        for rec in (ok1, bad, ok2):
            post(cfg.inbox, rec)
        real_check = EpochState.check

        def check(self: EpochState, record: Any) -> Any:
            if record.record_id == bad.record_id:
                raise KeyError("checker bug")
            return real_check(self, record)

        monkeypatch.setattr(EpochState, "check", check)
        kind, payload = v.propose(1, 0)
        assert kind == "block"
        assert [r["signer"] for r in payload["records"]] == ["a", "c"]
        reason = (cfg.inbox / "rejected" / f"{bad.record_id}.json.reason").read_text()
        assert "participant_joined record could not be checked: KeyError" in reason
        monkeypatch.undo()
        # The block the proposer built is the one every voter computes.
        block = Block.from_dict(payload)
        from ledger.block import check_block

        new = check_block(v.state, block, height=1, prev=canonical_hash(w.genesis))
        assert new.state_hash() == block.state_hash
