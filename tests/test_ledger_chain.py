"""The chain on disk (ledger/chain.py), blocks and certificates (ledger/block.py), and the
auditor behind `python -m ledger verify-chain` (ledger/audit.py, ledger/__main__.py).

Chains are built offline with the testkit's deterministic keys, as consensus would write
them, then damaged on purpose: a torn tail (half a line), flipped bytes, forged or too-small
certificates, a quorum that signs a wrong state. The CLI runs in-process through `main(argv)`.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest

from gonka_hpc.canonical import canonical_hash
from gonka_hpc.records import SignedRecord, signing_bytes
from ledger.__main__ import main
from ledger.audit import audit_chain
from ledger.block import (
    Block,
    InvalidBlock,
    check_block,
    check_certificate,
    has_quorum,
    make_certificate,
    precommit_bytes,
    sign_precommit,
)
from ledger.chain import (
    CHAIN_FILE,
    Chain,
    ChainError,
    StoredBlock,
    find_records,
    head,
    read_chain,
)
from ledger.state import EpochState, replay
from ledger.testkit import RecordMaker, World, next_block_state


@pytest.fixture
def world() -> World:
    return World()


def story(w: World) -> list[list[RecordMaker]]:
    """Three blocks of an epoch: joins; a job, its shard (drawn from block 1) and its commit;
    the verdict (its sample block is block 2, which holds the commit) and the close."""
    return [
        [w.join("ta"), w.join("exec-a"), w.join("ver")],
        [w.job("j1"), lambda st: w.assign_to(st, "j1", "s1", "exec-a"),
         w.commit("j1", "s1", "exec-a")],
        [lambda st: w.judge(st, "j1", "s1"), w.close()],
    ]


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    cap = capsys.readouterr()
    return code, cap.out + cap.err  # OK lines on stdout, ERROR lines on stderr


def rewrite_line(chain_dir: Path, height: int, **changes: object) -> None:
    """Replace block `height`'s stored line with a modified StoredBlock (a forger's edit)."""
    path = chain_dir / CHAIN_FILE
    lines = path.read_bytes().split(b"\n")
    old = StoredBlock.decode_line(lines[height - 1])
    fields = {"block": old.block, "hash": old.hash, "certificate": old.certificate, **changes}
    new = StoredBlock(fields["block"], fields["hash"], tuple(fields["certificate"]))  # type: ignore[arg-type]
    lines[height - 1] = new.encode_line().rstrip(b"\n")
    path.write_bytes(b"\n".join(lines))


# --- append and read ---------------------------------------------------------------------------


def test_empty_chain_head_is_genesis(tmp_path: Path, world: World) -> None:
    Chain.open(tmp_path / "v0", world.genesis)
    assert head(tmp_path / "v0") == (0, canonical_hash(world.genesis))
    assert read_chain(tmp_path / "v0") == []


def test_append_and_read(tmp_path: Path, world: World) -> None:
    batches = story(world)
    chain = world.build_chain(tmp_path / "v0", batches)
    stored = read_chain(tmp_path / "v0")
    assert [s.height for s in stored] == [1, 2, 3]
    assert stored[0].block.prev == canonical_hash(world.genesis)
    assert stored[1].block.prev == stored[0].hash
    assert head(tmp_path / "v0") == (3, chain.head_hash) == (3, stored[-1].hash)
    assert stored == chain.blocks
    # Every line is canonical and ends with a newline.
    raw = (tmp_path / "v0" / CHAIN_FILE).read_bytes()
    assert raw.count(b"\n") == 3 and raw.endswith(b"\n")
    assert raw.split(b"\n")[0] + b"\n" == stored[0].encode_line()
    ids = {SignedRecord.from_dict(r).record_id: s.height for s in stored for r in s.block.records}
    assert len(ids) == sum(len(b) for b in batches)
    assert find_records(tmp_path / "v0", [*ids, "f" * 64]) == ids
    reopened = Chain.open(tmp_path / "v0", world.genesis)
    assert reopened.height == 3 and reopened.recovered_bytes == 0


def test_append_must_extend_head(tmp_path: Path, world: World) -> None:
    chain = world.build_chain(tmp_path / "v0", story(world)[:1])
    b = chain.blocks[0].block
    with pytest.raises(ChainError, match="does not extend head"):
        chain.append(b, chain.blocks[0].certificate)


def test_other_genesis_is_refused(tmp_path: Path, world: World) -> None:
    world.build_chain(tmp_path / "v0", story(world)[:1])
    with pytest.raises(ChainError, match="different genesis"):
        Chain.open(tmp_path / "v0", World(seed="other").genesis)


# --- crash safety ------------------------------------------------------------------------------


def test_torn_tail_is_recovered_on_open(tmp_path: Path, world: World,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "v0"
    world.build_chain(d, story(world)[:2])
    path = d / CHAIN_FILE
    good = path.read_bytes()
    third = world.build_chain(tmp_path / "full", story(world)).blocks[2].encode_line()
    path.write_bytes(good + third[: len(third) // 2])  # a crash in the middle of an append
    assert len(read_chain(d)) == 2  # readers ignore the torn tail
    code, out = run_cli(capsys, "verify-chain", str(d))
    assert code == 0 and "torn tail bytes ignored" in out
    chain = Chain.open(d, world.genesis)
    assert chain.recovered_bytes == len(third) // 2
    assert path.read_bytes() == good
    # The validator goes on appending after recovery, and the result is a valid chain.
    full = read_chain(tmp_path / "full")
    chain.append(full[2].block, full[2].certificate)
    assert path.read_bytes() == (tmp_path / "full" / CHAIN_FILE).read_bytes()
    assert audit_chain(d).height == 3


def test_unparsable_last_line_is_recovered_but_middle_corruption_is_not(
        tmp_path: Path, world: World) -> None:
    d = tmp_path / "v0"
    world.build_chain(d, story(world))
    path = d / CHAIN_FILE
    good = path.read_bytes()
    path.write_bytes(good + b'{"block":{"v":1,"hei\n')
    assert Chain.open(d, world.genesis).height == 3
    assert path.read_bytes() == good
    lines = good.split(b"\n")
    lines[1] = lines[1][:-5]
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(ChainError, match="line 2 .* is corrupted"):
        Chain.open(d, world.genesis)


# --- certificates ------------------------------------------------------------------------------


def test_certificate_quorum_is_more_than_two_thirds(world: World) -> None:
    vals = world.genesis["validators"]
    assert has_quorum(vals, [0, 1, 2]) and not has_quorum(vals, [0, 1])
    assert not has_quorum(vals, [0, 0, 0, 1])  # one validator counts once
    weighted = [{**v, "weight": w} for v, w in zip(vals, [5, 1, 1, 1], strict=True)]
    assert has_quorum(weighted, [0, 1]) and not has_quorum(weighted, [1, 2, 3])


def test_certificate_rejects_bad_votes(world: World) -> None:
    vals = world.genesis["validators"]
    block = Block(1, 0, canonical_hash(world.genesis), "validator-1", (), "0" * 64)
    votes = [sign_precommit(world.identity(f"validator-{i}"), i, block) for i in range(4)]
    check_certificate(vals, block, make_certificate(vals, block, votes))
    # validator-1 signs in validator-2's name
    forged = {"index": 2, "validator": "validator-2",
              "signature": world.identity("validator-1").sign(
                  precommit_bytes(1, 0, block.hash))}
    assert make_certificate(vals, block, [votes[0], votes[1], forged, None]) == votes[:2]
    with pytest.raises(InvalidBlock, match="vote of validator 2 .* does not verify"):
        check_certificate(vals, block, [votes[0], votes[1], forged])
    with pytest.raises(InvalidBlock, match="not sorted"):
        check_certificate(vals, block, [votes[1], votes[0], votes[2]])
    with pytest.raises(InvalidBlock, match="not more than 2/3"):
        check_certificate(vals, block, votes[:2])
    other = Block(1, 1, block.prev, "validator-2", (), "0" * 64)  # a vote for another block
    with pytest.raises(InvalidBlock, match="does not verify"):
        check_certificate(vals, other, votes[:3])


# --- blocks against the state ------------------------------------------------------------------


def test_the_state_knows_the_hashes_of_finalized_blocks(tmp_path: Path, world: World) -> None:
    chain = world.build_chain(tmp_path / "v0", story(world))
    hashes = [s.hash for s in chain.blocks]
    st = audit_chain(tmp_path / "v0").state
    assert st.height == 3
    assert [st.block_hash(h) for h in range(4)] == [canonical_hash(world.genesis), *hashes[:2],
                                                     None]
    assert st.height_of(hashes[0]) == 1 and st.height_of(hashes[2]) is None
    b = st.batch("j1", "s1")
    assert b.block_hash == hashes[0]  # drawn from block 1, the last final one at height 2
    assert (b.commit_height, b.sample_block) == (2, hashes[1])
    verdict = SignedRecord.from_dict(chain.blocks[2].block.records[0])
    assert verdict.body["sample_block"] == hashes[1]
    assert st.participant("exec-a").join_height == 1
    # replay (what the CLI uses) agrees with the audit (what consensus does).
    assert replay(world.genesis, [s.block for s in chain.blocks]).state_hash() == st.state_hash()
    assert next_block_state(tmp_path / "v0").block_hash(3) == hashes[2]


def _deep(n: int) -> object:
    out: object = []
    for _ in range(n):
        out = [out]
    return out


def test_check_block_turns_any_error_into_an_invalid_block(
        tmp_path: Path, world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """A validator votes nil on a bad block; it never crashes on one."""
    chain = world.build_chain(tmp_path / "v0", story(world)[:1])
    st = audit_chain(tmp_path / "v0").state
    before = st.state_hash()
    ta = world.identity("ta")
    body = {"job_id": "j1", "shard_id": "s1", "executor": "exec-a", "request_ids": [[1]],
            "max_tokens_total": 1, "shard_hash": "0" * 64, "block_hash": chain.head_hash}
    garbage = SignedRecord("inference_assigned", "ta", body,
                           ta.sign(signing_bytes("inference_assigned", "ta", body)))
    nested = {"v": 1, "kind": "job_accepted", "signer": "ta", "signature": "00" * 64,
              "body": {"job_id": _deep(100_000)}}
    good = world.job("j1").to_dict()
    for records, pattern in (([garbage.to_dict()], "undecodable record.*request_ids"),
                             ([nested], "undecodable record: RecursionError"),
                             ([good, {"v": 1}], "undecodable record")):
        block = Block(2, 0, chain.head_hash, "validator-2", tuple(records), "0" * 64)
        with pytest.raises(InvalidBlock, match=pattern):
            check_block(st, block, height=2, prev=chain.head_hash)

    def boom(self: EpochState, record: SignedRecord) -> None:
        raise RuntimeError("checker bug")

    block = Block(2, 0, chain.head_hash, "validator-2", (good,), "0" * 64)
    monkeypatch.setattr(EpochState, "check", boom)
    with pytest.raises(InvalidBlock, match=r"height 2: record 0 \(job_accepted by 'ta'\): "
                                           "RuntimeError: checker bug"):
        check_block(st, block, height=2, prev=chain.head_hash)
    monkeypatch.undo()
    assert st.state_hash() == before  # the state before the block is untouched


# --- verify-chain ------------------------------------------------------------------------------


def test_verify_chain_ok(tmp_path: Path, world: World,
                         capsys: pytest.CaptureFixture[str]) -> None:
    world.build_chain(tmp_path / "v0", story(world), voters=[0, 2, 3])
    code, out = run_cli(capsys, "verify-chain", str(tmp_path / "v0"))
    assert code == 0, out
    assert out.startswith(f"OK {tmp_path / 'v0'}: height 3, 8 records") and "epoch closed" in out
    st = audit_chain(tmp_path / "v0").state
    assert st.closed and st.reputation("exec-a") == 1


def test_verify_chain_detects_every_flipped_byte(tmp_path: Path, world: World,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "v0"
    world.build_chain(d, story(world))
    path = d / CHAIN_FILE
    good = path.read_bytes()
    rng = random.Random(7)
    # Every byte but the final newline (flipping it makes a torn tail, which the single-dir
    # audit reports as ignored and the multi-dir comparison catches).
    for pos in sorted(rng.sample(range(len(good) - 1), 40)):
        bad = bytearray(good)
        bad[pos] ^= 0x01
        path.write_bytes(bytes(bad))
        code, out = run_cli(capsys, "verify-chain", str(d))
        assert code == 1 and out.startswith(f"ERROR {d}"), (pos, out)
    path.write_bytes(good)
    assert run_cli(capsys, "verify-chain", str(d))[0] == 0


def test_verify_chain_names_height_of_forged_certificate(
        tmp_path: Path, world: World, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "v0"
    chain = world.build_chain(d, story(world))
    cert = list(chain.blocks[1].certificate)
    rewrite_line(d, 2, certificate=cert[:2])
    code, out = run_cli(capsys, "verify-chain", str(d))
    assert code == 1 and "height 2: certificate weight is not more than 2/3" in out
    forged = dict(cert[3], signature=cert[2]["signature"])
    rewrite_line(d, 2, certificate=[*cert[:3], forged])
    code, out = run_cli(capsys, "verify-chain", str(d))
    assert code == 1 and "height 2: certificate vote of validator 3" in out


def test_verify_chain_catches_a_quorum_signing_a_wrong_state(
        tmp_path: Path, world: World, capsys: pytest.CaptureFixture[str]) -> None:
    """Even a full certificate does not make an invalid transition valid."""
    d = tmp_path / "v0"
    chain = Chain.open(d, world.genesis)
    st = EpochState.from_genesis(world.genesis)
    st.begin_block(1, chain.head_hash)
    joins = [world.join("ta")]
    st.apply(joins[0])
    good_hash = st.state_hash()
    # A forged job: the client never authorized it (its signature is the TA's).
    forged = world.job("j1")
    body = dict(forged.body, escrow=999_999)
    evil = SignedRecord(forged.kind, forged.signer, body, forged.signature)
    for height, (records, state_hash) in enumerate(
            [(joins, good_hash), ([evil], "ab" * 32)], start=1):
        block = Block(height, 0, chain.head_hash, f"validator-{height % 4}",
                      tuple(r.to_dict() for r in records), state_hash)
        votes = [sign_precommit(world.identity(f"validator-{i}"), i, block) for i in range(4)]
        chain.append(block, votes)
    code, out = run_cli(capsys, "verify-chain", str(d))
    assert code == 1 and "height 2: record 0 (job_accepted by 'ta'): bad signature" in out


def test_verify_chain_several_dirs_must_be_identical(
        tmp_path: Path, world: World, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    world.build_chain(data / "validator-0", story(world))
    for i in (1, 2, 3):  # one chain dir per genesis validator
        shutil.copytree(data / "validator-0", data / f"validator-{i}")
    code, out = run_cli(capsys, "verify-chain", str(data))  # the data dir expands
    assert code == 0 and "OK 4 chain dirs are byte-identical" in out
    # validator-2 lags one block behind: valid on its own, but not identical.
    world.build_chain(tmp_path / "short", story(world)[:2])
    shutil.copy(tmp_path / "short" / CHAIN_FILE, data / "validator-2" / CHAIN_FILE)
    code, out = run_cli(capsys, "verify-chain", *(str(data / f"validator-{i}") for i in range(3)))
    assert code == 1
    assert "ERROR not identical" in out and "validator-2/chain.log" in out


def test_verify_chain_missing_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run_cli(capsys, "verify-chain", str(tmp_path / "nope"))
    assert code == 1 and "not found" in out


def test_help_teaches_with_examples(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--help"], ["run", "--help"], ["verify-chain", "--help"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 0
        out = capsys.readouterr().out
        assert "examples:" in out and "python -m ledger" in out
