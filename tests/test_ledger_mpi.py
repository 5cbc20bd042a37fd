"""End to end: the validators as a real MPI job (`mpiexec -n 4 python -m ledger run`).

Each test generates keys and a genesis in tmp, starts mpiexec as a subprocess, posts signed
records with gonka_hpc.inbox.post, polls (`wait_until`, never a fixed sleep) until they are
final on chain, writes INBOX/STOP and waits for exit 0. Then the four chain.log files must be
byte-identical and pass `verify-chain`. The restart test stops the job, damages two chain dirs
(a lagging validator, a torn tail), restarts on the same dirs and checks that heights
continue with no fork. Timeouts scale with $GONKA_TIMEOUT_FACTOR; tmp dirs (chains, logs)
stay behind for post-mortems.

These tests launch mpiexec themselves, so they are marked `slow`, not `mpi`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from ledgerkit import FACTOR, N, Network, wait_until

from gonka_hpc.records import SignedRecord, signing_bytes
from ledger.audit import audit_chain
from ledger.chain import CHAIN_FILE, head, read_chain
from ledger.testkit import World, next_block_state

pytestmark = pytest.mark.slow

@pytest.fixture
def net(tmp_path: Path) -> Iterator[Network]:
    network = Network(tmp_path, World(n_validators=N, clients={"alice": 1_000_000}))
    yield network
    network.kill()


def test_an_epoch_is_finalized_by_four_validators(net: Network,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    w = net.world
    net.start()
    joins = [w.join("ta"), w.join("exec-a", 10), w.join("exec-b", 20), w.join("ver", 5)]
    net.wait_final(net.post(*joins))
    # The TA draws executors from the last finalized block, as the validators will check.
    chain0 = net.chain_dirs()[0]
    _, drawn_from = head(chain0)
    st = next_block_state(chain0)
    job = [w.job("j1", escrow=10_000),
           w.assign_to(st, "j1", "s1", "exec-a", 2, block_hash=drawn_from, max_tokens_total=500),
           w.assign_to(st, "j1", "s2", "exec-b", 2, block_hash=drawn_from, max_tokens_total=500)]
    # A verdict posted before the commit it judges: invalid now, so it must stay pending; it
    # names a wrong sample block (the commit's block does not exist yet), so once the commit is
    # final it is rejected for good.
    early_verdict = w.verdict("ver", "j1", "s2", "exec-b", passed=False,
                              sample_block=drawn_from)
    forged = SignedRecord("participant_joined", "mallory", w.join("mallory").body, "00" * 64)
    first = net.post(*job, early_verdict, forged)
    heights = net.wait_final(first[:-2])
    assert heights[first[0]] <= heights[first[1]]
    wait_until(lambda: (net.inbox / "rejected" / f"{first[-1]}.json.reason").exists(), 10,
               "the forged record to be rejected", net)
    assert "bad signature" in (net.inbox / "rejected" / f"{first[-1]}.json.reason").read_text()
    assert first[-2] not in net.final([first[-2]])  # its batch is not committed yet
    assert not (net.inbox / "rejected" / f"{first[-2]}.json").exists()

    commits = [w.commit("j1", "s1", "exec-a", n_tokens=100),
               w.commit("j1", "s2", "exec-b", n_tokens=50)]
    heights = net.wait_final(net.post(*commits))
    st = next_block_state(chain0)
    s1, s2 = st.batch("j1", "s1"), st.batch("j1", "s2")
    assert s1.sample_block == st.block_hash(heights[commits[0].record_id])
    assert st.verification_duty("j1", "s1")[0] == s1.sample_block
    rest = net.post(w.judge(st, "j1", "s1", passed=True), w.judge(st, "j1", "s2", passed=False),
                    w.deliver("j1"))
    vheights = net.wait_final(rest)
    assert min(vheights.values()) > max(heights.values())  # verdicts come after their commits
    wait_until(lambda: (net.inbox / "rejected" / f"{first[-2]}.json.reason").exists(), 10,
               "the early verdict to be rejected", net)
    reason = (net.inbox / "rejected" / f"{first[-2]}.json.reason").read_text()
    assert "is not" in reason and "the hash of block" in reason, reason
    assert s2.sample_block is not None
    # the failing verdict opened a dispute: the panel drawn from its block votes it through
    st = next_block_state(chain0)
    net.wait_final(net.post(*w.panel_votes(st, "j1", "s2", passed=False)))
    close = net.post(w.close(validator=3))
    net.wait_final(close)

    net.stop()
    net.assert_identical_and_valid()
    assert not list(net.inbox.glob("*.json"))  # every record is final or rejected
    st = audit_chain(net.data / "validator-2").state
    s = st.settlement
    assert st.closed and s is not None
    assert s["forfeited"] == ["exec-b"] and s["refunds"] == {"alice": 500 + 8_500}
    assert s["payments"] == {"exec-a": 100 * 10} and s["unverified"] == []
    assert s["rewards"] == {"exec-a": 100 * 10 + 100_000}
    assert st.reputation("exec-a") == 1 and st.reputation("exec-b") == 0
    assert "committed height" in net.log_text() and "[validator-3]" in net.log_text()


def test_garbage_records_never_kill_the_validators(tmp_path: Path) -> None:
    """Records that blow up while decoding (NaN, a list of lists as request ids, JSON nested
    too deep for the parser, non-UTF-8 bytes) go to rejected/ with a reason; the job lives on,
    finalizes the good records and stops cleanly."""
    w = World(n_validators=2, clients={"alice": 1_000_000})
    net = Network(tmp_path, w)
    try:
        net.start()
        ta = w.identity("ta")
        body = {"job_id": "j1", "shard_id": "s1", "executor": "exec-a", "request_ids": [[1]],
                "max_tokens_total": 1, "shard_hash": "0" * 64, "block_hash": "0" * 64}
        sig = ta.sign(signing_bytes("inference_assigned", "ta", body))
        lists = SignedRecord("inference_assigned", "ta", body, sig)
        garbage = {
            "nan": b'{"v":1,"kind":"inference_assigned","signer":"ta","signature":"'
                   + b"0" * 128 + b'","body":{"request_ids":[NaN]}}',
            "lists": lists.encode(),
            "deep": b'{"v":1,"body":' + b"[" * 200_000 + b"]" * 200_000 + b"}",
            "bytes": b"\xff\xfe{not json",
        }
        for name, data in garbage.items():
            (net.inbox / f"{name}.json").write_bytes(data)
        good = net.post(w.join("ta"), w.join("exec-a"))
        net.wait_final(good)
        for name in garbage:
            wait_until(lambda n=name: (net.inbox / "rejected" / f"{n}.json.reason").exists(),
                       10, f"{name}.json to be rejected", net)
        reasons = {n: (net.inbox / "rejected" / f"{n}.json.reason").read_text()
                   for n in garbage}
        assert "non-finite" in reasons["nan"] or "NaN" in reasons["nan"], reasons["nan"]
        assert "request_ids" in reasons["lists"], reasons["lists"]
        assert "RecursionError" in reasons["deep"], reasons["deep"]
        assert "undecodable" in reasons["bytes"], reasons["bytes"]
        # Still alive: a later record is finalized too.
        net.wait_final(net.post(w.join("ver")))
        net.stop()
        net.assert_identical_and_valid()
        assert len(audit_chain(net.chain_dirs()[1]).state.participants()) == 3
    finally:
        net.kill()


def test_throughput_of_a_burst_of_records(net: Network) -> None:
    """Measures records/s and blocks/s for 300 self-signed joins (printed with -s)."""
    w = net.world
    burst = [w.join(f"p{i:03d}", 1 + i % 7) for i in range(300)]
    net.start()
    wait_until(lambda: (net.data / "head.json").exists(), 20, "validators ready", net)
    t0 = time.monotonic()
    ids = net.post(*burst)
    net.wait_final(ids, timeout=60)
    dt = time.monotonic() - t0
    blocks = head(net.data / "validator-0")[0]
    print(f"\nledger throughput: {len(ids)} records in {blocks} blocks, {dt:.2f}s: "
          f"{len(ids) / dt:.0f} records/s, {blocks / dt:.1f} blocks/s")
    net.stop()
    net.assert_identical_and_valid()
    assert len(audit_chain(net.data / "validator-1").state.participants()) == 300


def test_restart_continues_without_fork_and_lagging_validators_catch_up(net: Network) -> None:
    w = net.world
    net.start()
    net.wait_final(net.post(w.join("ta")))
    net.wait_final(net.post(w.join("exec-a"), w.job("j1")))
    net.stop()
    before = (net.chain_dirs()[0] / CHAIN_FILE).read_bytes()
    h_before, hash_before = head(net.chain_dirs()[0])
    assert h_before >= 2
    # validator-2 lost its last block; validator-1 crashed in the middle of an append.
    lines = before.split(b"\n")
    (net.chain_dirs()[2] / CHAIN_FILE).write_bytes(b"\n".join(lines[:-2]) + b"\n")
    with open(net.chain_dirs()[1] / CHAIN_FILE, "ab") as fh:
        fh.write(lines[0][:40])
    (net.chain_dirs()[3] / CHAIN_FILE).unlink()  # validator-3 lost its whole chain

    net.start()
    # exec-a is the only participant but the TA: every request is drawn to it.
    ids = net.post(w.assign("j1", "s1", "exec-a", block_hash=hash_before),
                   w.commit("j1", "s1", "exec-a"))
    heights = net.wait_final(ids)
    assert min(heights.values()) == h_before + 1
    net.stop()
    net.assert_identical_and_valid()
    after = (net.chain_dirs()[0] / CHAIN_FILE).read_bytes()
    assert after.startswith(before)  # no fork: the old chain is a prefix of the new one
    blocks = read_chain(net.chain_dirs()[3])
    assert blocks[h_before].block.prev == hash_before
    log = net.log_text()
    assert f"[validator-2] caught up from height {h_before - 1} to {h_before}" in log
    assert f"[validator-3] caught up from height 0 to {h_before}" in log
    assert "[validator-1] recovered a torn chain tail" in log


def test_wrong_world_size_fails_loudly(net: Network) -> None:
    net.start(n=2)
    assert net.proc is not None
    rc = net.proc.wait(timeout=20 * FACTOR)
    assert rc != 0
    assert "MPI world has 2 ranks but genesis has 4 validators" in net.log_text()


def test_a_failing_rank_aborts_the_whole_job(net: Network) -> None:
    """Rank 2 has the wrong key: it must take the job down, not leave 3 ranks waiting."""
    net.world.identity("validator-3").save(net.keys / "validator-2.key")
    net.start()
    assert net.proc is not None
    rc = net.proc.wait(timeout=20 * FACTOR)
    assert rc != 0
    assert "[validator-2] ERROR" in net.log_text()
    assert "is not the key of genesis validator 2" in net.log_text()


def test_forked_chain_dirs_refuse_to_start(net: Network) -> None:
    """Two histories for the same genesis: the job stops instead of picking one silently."""
    w = net.world
    for i in range(3):
        w.build_chain(net.data / f"validator-{i}", [[w.join("ta")], [w.join("exec-a")]])
    w.build_chain(net.data / "validator-3", [[w.join("other")]])
    net.start()
    assert net.proc is not None
    assert net.proc.wait(timeout=20 * FACTOR) != 0
    assert "validator chains disagree at height 1" in net.log_text()
