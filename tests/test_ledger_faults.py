"""Faults, with real processes: validator jobs (`mpiexec -n 4|7 python -m ledger run`) in which
chosen ranks misbehave through the TEST-ONLY `--fault-injection` option (ledger/faults.py).

- a silent validator (alive, sends nothing, drops everything): the rest keep finalizing
  (rounds whose proposer it is time out and move on), then it catches up;
- a Byzantine validator that double-signs: honest ones finalize and the equivocation evidence
  (both signed votes) lands on the chain, once per offence; also when it sends one vote to
  half the validators and another to the rest (relayed votes bring the halves together);
- with 7 validators, one proposing invalid blocks and one withholding every vote (f = 2):
  honest ones finalize, the invalid blocks get no quorum, no certificate holds the withholder;
- kill -9 of the whole job while blocks are being decided, then a restart: every chain's old
  blocks are a prefix of its new ones (no fork) and every record is final exactly once;
- a rank that raises takes the job down instead of leaving the others waiting;
- a rank that sends malformed frames and a malicious pickle: ignored, and no code runs.
After each run every chain holds the same blocks and passes `verify-chain` on its own.
These tests launch mpiexec themselves, so they are marked `slow`, not `mpi`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from ledgerkit import FACTOR, Network, wait_until

from ledger.audit import audit_chain
from ledger.chain import read_chain, record_id_of
from ledger.proposer import proposer_index
from ledger.testkit import World

pytestmark = pytest.mark.slow


@pytest.fixture
def net4(tmp_path: Path) -> Iterator[Network]:
    network = Network(tmp_path, World(n_validators=4))
    yield network
    network.kill()


@pytest.fixture
def net7(tmp_path: Path) -> Iterator[Network]:
    network = Network(tmp_path, World(n_validators=7))
    yield network
    network.kill()


def _records(net: Network, i: int = 0) -> list[dict[str, object]]:
    return [r for s in read_chain(net.chain_dirs()[i]) for r in s.block.records]


def test_a_silent_validator_does_not_stop_the_others_and_catches_up(net4: Network) -> None:
    net = net4
    w = net.world
    silence = 5 * FACTOR
    net.start(faults={2: {"behaviour": "silent", "from_height": 2, "seconds": silence}})
    net.wait_final(net.post(w.join("p0")))
    # validator-2 is silent from height 2 on: 3 of 4 equal weights (> 2/3) finalize, and the
    # heights it should propose move on to round 1 after the propose timeout.
    during = []
    for i in range(1, 6):
        during += net.post(w.join(f"p{i}"))
        net.wait_final(during[-1:])
    blocks = read_chain(net.chain_dirs()[0])
    without = [s for s in blocks if 2 not in {c["index"] for c in s.certificate}]
    assert without, "no block was finalized without the silent validator"
    vals = w.genesis["validators"]
    skipped = [s.block for s in blocks if s.block.round > 0]
    assert any(proposer_index(vals, b.height, 0) == 2 for b in skipped)
    # Silence over: new blocks reach it, it asks for the ones it missed and catches up.
    more: list[str] = []
    for i in range(60):
        more += net.post(w.join(f"q{i}"))
        net.wait_final(more[-1:])
        if net.height(2) == net.height(0):
            break
    wait_until(lambda: net.height(2) == net.height(0), 10, "validator-2 to catch up", net)
    net.stop()
    net.assert_same_blocks_and_valid()
    assert "[validator-2] caught up from height 1 to" in net.log_text()
    assert len(audit_chain(net.chain_dirs()[2]).state.participants()) == 6 + len(more)


def test_a_double_signing_validator_leaves_evidence_on_chain(net4: Network) -> None:
    net = net4
    w = net.world
    net.start(faults={1: {"behaviour": "equivocate", "from_height": 2, "until_height": 3}})
    ids = net.post(w.join("p0"))
    net.wait_final(ids)
    ids = net.post(w.join("p1"))  # height 2: validator-1 double-signs its prevote and precommit

    def evidence() -> list[dict[str, object]]:
        return [r for r in _records(net) if r["kind"] == "equivocation_evidence"]

    net.wait_final(ids)
    def offences() -> set[tuple[object, ...]]:
        return {(b["validator"], b["height"], b["step"])  # type: ignore[index]
                for b in (r["body"] for r in evidence())}

    # Both double-signed votes (in every round height 2 took: one, unless the machine is slow).
    wait_until(lambda: offences() == {("validator-1", 2, "prevote"),
                                      ("validator-1", 2, "precommit")},
               30, "evidence of both double-signed votes", net)
    net.wait_final(net.post(w.join("p2")))
    net.stop()
    net.assert_same_blocks_and_valid()
    found = evidence()
    assert all(r["signer"] != "validator-1" for r in found)  # reported by honest validators
    state = audit_chain(net.chain_dirs()[3]).state
    keys = sorted(state.equivocations())
    assert len(keys) == len(found) and "validator-1/2/0/prevote" in keys
    assert all(k.startswith("validator-1/2/") for k in keys)
    # The other honest validators' reports of the same offences were refused as duplicates.
    reasons = [p.read_text() for p in (net.inbox / "rejected").glob("*.reason")]
    assert reasons and all("already on record" in r for r in reasons), reasons
    assert "equivocation by validator-1 at height 2" in net.log_text()


def test_a_validator_that_tells_peers_different_votes_is_caught_through_relays(
        net4: Network) -> None:
    """validator-1 sends each vote to the even ranks and a conflicting one to the odd ranks,
    so no honest validator receives both from it: only relayed votes bring the two halves
    together, and the evidence still lands on the chain."""
    net = net4
    w = net.world
    net.start(faults={1: {"behaviour": "split-vote", "from_height": 2, "until_height": 3}},
              extra=("--timeout-scale", str(FACTOR)))  # time for relays on a loaded machine
    net.wait_final(net.post(w.join("p0")))
    net.wait_final(net.post(w.join("p1")))  # height 2: validator-1 splits its votes

    def offences() -> set[tuple[object, ...]]:
        return {(r["body"]["validator"], r["body"]["height"], r["body"]["step"])  # type: ignore[index]
                for r in _records(net) if r["kind"] == "equivocation_evidence"}

    wait_until(lambda: {("validator-1", 2, "prevote"),
                        ("validator-1", 2, "precommit")} <= offences(),
               30, "evidence of both split votes", net)
    net.wait_final(net.post(w.join("p2")))
    net.stop()
    net.assert_same_blocks_and_valid()
    assert {o[0] for o in offences()} == {"validator-1"}
    assert "equivocation by validator-1 at height 2" in net.log_text()


def test_garbage_and_pickles_from_a_rank_are_refused_and_run_no_code(net4: Network) -> None:
    """validator-2 sends every peer malformed frames and a pickle that would create
    INBOX/PWNED if it were unpickled. Messages are byte frames with JSON headers
    (ledger/wire.py), never pickle: the honest ranks log and ignore all of it, the file is
    never created, and blocks keep finalizing."""
    net = net4
    w = net.world
    net.start(faults={2: {"behaviour": "garbage"}})
    ids: list[str] = []
    for i in range(3):
        ids += net.post(w.join(f"p{i}"))
        net.wait_final(ids[-1:])
    net.stop()
    net.assert_same_blocks_and_valid()
    assert not (net.inbox / "PWNED").exists()
    log = net.log_text()
    for r in (0, 1, 3):
        assert f"[validator-{r}] ignored a bad message from rank 2" in log
    assert "not JSON" in log and "header fields" in log and "carries a payload" in log
    assert "bad value" in log and "RecursionError" in log and "OverflowError" in log
    assert len(audit_chain(net.chain_dirs()[0]).state.participants()) == 3


def test_seven_validators_finalize_despite_an_invalid_proposer_and_a_withholder(
        net7: Network) -> None:
    net = net7
    w = net.world
    net.start(faults={3: {"behaviour": "invalid-proposal"}, 5: {"behaviour": "withhold"}})
    ids: list[str] = []
    for i in range(6):  # heights 1..6: validator-3 proposes height 3, validator-5 height 5
        ids += net.post(w.join(f"p{i}"))
        net.wait_final(ids[-1:], timeout=40)
    net.stop(timeout=40)
    hashes = net.assert_same_blocks_and_valid()
    assert len(hashes) == 6
    blocks = read_chain(net.chain_dirs()[0])
    assert all(5 not in {c["index"] for c in s.certificate} for s in blocks)
    assert all(s.block.proposer != "validator-3" for s in blocks)
    third = blocks[2].block  # validator-3 proposes height 3 in round 0: a later round won
    assert third.round >= 1, third
    log = net.log_text()
    assert "invalid block" in log and "state_hash" in log
    assert len(audit_chain(net.chain_dirs()[6]).state.participants()) == 6


def test_kill_9_mid_round_then_restart_loses_nothing_and_forks_nothing(net4: Network) -> None:
    net = net4
    w = net.world
    net.start()
    first = net.post(*(w.join(f"a{i}") for i in range(3)))
    net.wait_final(first)
    base = net.height(0)
    # A stream of records, one by one, and the whole job killed while it is deciding them.
    second: list[str] = []
    for i in range(12):
        second += net.post(w.join(f"b{i}"))
        if net.height(0) >= base + 2:
            break
        wait_until(lambda ids=list(second): len(net.final(ids)) >= len(ids) - 1, 20,
                   "the stream to move", net)
    net.kill9()
    before = [[s.hash for s in read_chain(d)] for d in net.chain_dirs()]
    late = net.post(*(w.join(f"c{i}") for i in range(3)))  # posted while the job is down
    net.start()
    everything = first + second + late
    net.wait_final(everything, timeout=40)
    net.stop()
    net.assert_same_blocks_and_valid()
    for i, d in enumerate(net.chain_dirs()):
        now = [s.hash for s in read_chain(d)]
        assert now[:len(before[i])] == before[i], f"validator-{i} forked"
    counts = Counter(record_id_of(r) for r in _records(net))
    assert all(counts[rid] == 1 for rid in everything)
    assert max(counts.values()) == 1


def test_a_rank_that_raises_takes_the_job_down(net4: Network) -> None:
    net = net4
    net.start(faults={1: {"behaviour": "raise", "from_height": 2}})
    net.wait_final(net.post(net.world.join("p0")))
    assert net.proc is not None
    rc = net.proc.wait(timeout=20 * FACTOR)
    assert rc != 0
    assert "fault injection: validator-1 raises at height 2" in net.log_text()
