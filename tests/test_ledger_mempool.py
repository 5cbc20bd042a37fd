"""The inbox as a validator reads it (ledger/mempool.py), the signature cache
(ledger/sigcache.py) and the test-only fault-injection file (ledger/faults.py), in one
process on tmp dirs: files and .jsonl bundles in order, bad records out with a reason, final
ones out of the way; a signature remembered only when it verified; a bad fault file refused
with its file and field named.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from gonka_hpc.errors import ValidationError
from gonka_hpc.inbox import post
from gonka_hpc.records import ArtifactBatchCommitted, SignedRecord
from ledger import sigcache
from ledger.faults import load_faults
from ledger.mempool import COMMITTED_DIR, REJECTED_DIR, Mempool
from ledger.testkit import World


@pytest.fixture
def world() -> World:
    return World(n_validators=4)


def _bundle(inbox: Path, name: str, lines: list[bytes], mtime_ns: int) -> Path:
    path = inbox / name
    path.write_bytes(b"\n".join(lines) + b"\n")
    os.utime(path, ns=(mtime_ns, mtime_ns))
    return path


def test_files_and_bundles_are_read_once_in_order(tmp_path: Path, world: World) -> None:
    a, b, c, d = (world.join(n) for n in "abcd")
    post(tmp_path, a)
    os.utime(tmp_path / f"{a.record_id}.json", ns=(3_000, 3_000))
    _bundle(tmp_path, "early.jsonl", [b.encode(), c.encode()], 1_000)
    (tmp_path / ".posting.json").write_bytes(d.encode())  # a post in progress: skipped
    pool = Mempool(tmp_path)
    assert pool.refresh() == 3
    assert [e.rid for e in pool.ordered()] == [b.record_id, c.record_id, a.record_id]
    assert pool.refresh() == 0  # nothing new: nothing re-read
    (tmp_path / ".posting.json").rename(tmp_path / "late.json")
    assert pool.refresh() == 1 and pool.ordered()[-1].rid == d.record_id
    assert all(e.record.record_id == e.rid for e in pool.ordered())


def test_a_bundle_leaves_once_every_record_is_resolved(tmp_path: Path, world: World) -> None:
    good, bad = world.join("good"), world.join("bad")
    forged = SignedRecord(bad.kind, bad.signer, bad.body, "00" * 64)
    bundle = _bundle(tmp_path, "b.jsonl", [good.encode(), forged.encode(), b"{not json"], 1)
    pool = Mempool(tmp_path)
    assert pool.refresh() == 2  # the unparsable line is rejected at once
    rejected = tmp_path / REJECTED_DIR
    reasons = [p.read_text() for p in rejected.glob("*.reason")]
    assert len(reasons) == 1 and "undecodable" in reasons[0] and "b.jsonl" in reasons[0]
    pool.reject(forged.record_id, "bad signature")
    assert (rejected / f"{forged.record_id}.json").read_bytes() == forged.encode()
    assert bundle.exists()  # the good record is not final yet
    pool.resolve([good.record_id])
    assert not bundle.exists() and (tmp_path / COMMITTED_DIR / "b.jsonl").exists()
    assert len(pool) == 0


def test_single_files_move_when_final_or_rejected(tmp_path: Path, world: World) -> None:
    x, y = world.join("x"), world.join("y")
    post(tmp_path, x)
    post(tmp_path, y)
    (tmp_path / "junk.json").write_bytes(b"\xff")
    pool = Mempool(tmp_path)
    pool.refresh()
    assert "undecodable" in (tmp_path / REJECTED_DIR / "junk.json.reason").read_text()
    pool.resolve([x.record_id])
    pool.reject(y.record_id, "nope")
    assert (tmp_path / COMMITTED_DIR / f"{x.record_id}.json").exists()
    assert (tmp_path / REJECTED_DIR / f"{y.record_id}.json.reason").read_text() == "nope\n"
    pool.resolve([x.record_id])  # twice, or a file another validator moved: no error


def test_the_signature_cache_remembers_only_what_verified(world: World) -> None:
    sigcache.clear()
    rec = world.join("p")
    pub = rec.body["pubkey"]
    forged = SignedRecord(rec.kind, rec.signer, rec.body, "11" * 64)
    assert not sigcache.record_signed_by(pub, forged)
    assert not sigcache.record_signed_by(pub, forged)  # a failure is never remembered
    assert not sigcache.record_signed_by("zz" * 32, rec)  # not a public key
    assert sigcache.record_signed_by(pub, rec)
    other = world.identity("q").public_hex
    assert not sigcache.record_signed_by(other, rec)  # remembered per key
    assert not sigcache.is_valid_signature(pub, b"x", rec.signature)
    sigcache.clear()


def test_the_fault_file_is_checked(tmp_path: Path) -> None:
    path = tmp_path / "faults.json"
    path.write_text(json.dumps({"2": {"behaviour": "silent", "from_height": 3, "seconds": 1}}))
    faults = load_faults(path)
    assert faults[2].behaviour == "silent" and faults[2].active(3) and not faults[2].active(2)
    assert load_faults(None) == {}
    for bad, field in [({"2": {"behaviour": "lie"}}, "behaviour"),
                       ({"x": {"behaviour": "silent"}}, "'x'"),
                       ({"1": {"behaviour": "silent", "when": 1}}, "'1'")]:
        path.write_text(json.dumps(bad))
        with pytest.raises(ValidationError) as exc:
            load_faults(path)
        assert str(path) in str(exc.value) and field in str(exc.value)


def test_a_decoded_record_keeps_its_canonical_bytes(world: World) -> None:
    """Decoding keeps the record's canonical bytes (its id is their hash, nothing is encoded
    again); a record posted non-canonically gets the same bytes and id; a value that only
    compares equal ("v": true for 1) is never taken for the canonical bytes; NaN is refused
    with a clear reason."""
    rec = world.join("ta")
    raw = rec.encode()
    got = SignedRecord.decode(raw)
    assert got.encode() == raw and got.record_id == rec.record_id
    assert got.typed_body() is got.typed_body()  # checked once
    spaced = json.dumps(json.loads(raw), indent=1, sort_keys=False).encode()
    assert spaced != raw
    again = SignedRecord.decode(spaced)
    assert again.encode() == raw and again.record_id == rec.record_id
    data = json.loads(raw)
    data["v"] = True
    loose = SignedRecord.from_dict(data, from_json=True)
    assert loose.encode() == raw and loose.record_id == rec.record_id
    assert b'"weight":10' in raw
    with pytest.raises(ValidationError, match="non-finite"):
        SignedRecord.decode(raw.replace(b'"weight":10', b'"weight":NaN'))


def _json_path(raw: bytes) -> SignedRecord:
    """The record as the plain `json` path decodes it (what the fast path must equal)."""
    return SignedRecord.from_dict(json.loads(raw))


@pytest.mark.parametrize("variant", ["canonical", "spaced", "reordered", "escaped"])
def test_records_decode_alike_on_the_fast_and_the_json_path(world: World,
                                                           variant: str) -> None:
    from gonka_hpc.canonical import canonical_bytes
    from gonka_hpc.records import Verdict, sign_record, signing_bytes

    v = world.identity("validator-1")
    recs = [world.join("p\u00e9"), world.commit("j", "s", "exec"), world.job("j2"),
            sign_record(v, Verdict("j", "s", "exec", "ab" * 32, ',"signature":"' + "0" * 128,
                                   2, 0, True, {"x": 1e-07, "s": 'q"\\\u2028'}))]
    for rec in recs:
        raw = rec.encode()
        if variant == "spaced":
            raw = json.dumps(rec.to_dict(), sort_keys=True).encode()
        elif variant == "reordered":
            raw = json.dumps(dict(reversed(list(rec.to_dict().items())))).encode()
        elif variant == "escaped":
            raw = json.dumps(rec.to_dict(), sort_keys=True, separators=(",", ":")).encode()
        fast, slow = SignedRecord.decode(raw), _json_path(raw)
        assert fast == slow == rec
        assert fast.encode() == slow.encode() == canonical_bytes(rec.to_dict())
        assert fast.record_id == slow.record_id == rec.record_id
        assert fast.signing_bytes() == signing_bytes(rec.kind, rec.signer, rec.body)
        assert fast.typed_body() == slow.typed_body()
        assert sigcache.record_signed_by(rec.body.get("pubkey") or
                                         world.identity(rec.signer).public_hex, fast)


def test_the_fast_body_check_judges_like_the_full_one(world: World) -> None:
    """A body of int/str fields only is built without the dataclass constructor when every
    field has exactly its type; any other value goes to the full check, which names it."""
    rec = world.commit("j", "s", "exec")
    body = rec.typed_body()
    assert body == ArtifactBatchCommitted(**rec.body)
    assert SignedRecord.from_dict(rec.to_dict()) == rec
    for name, value in (("n_tokens", True), ("n_requests", "32"), ("job_id", 5),
                        ("merkle_root", None), ("n_tokens", 1.5)):
        with pytest.raises(ValidationError) as exc:
            SignedRecord.from_dict({**rec.to_dict(), "body": {**rec.body, name: value}})
        assert exc.value.field == f"body.{name}"
    for key, value in (("kind", 1), ("signer", None), ("signature", b"ab")):
        with pytest.raises(ValidationError) as exc:
            SignedRecord.from_dict({**rec.to_dict(), key: value})
        assert exc.value.field == key


def test_a_record_with_bad_fields_is_refused_on_the_fast_path_too(world: World) -> None:
    rec = world.commit("j", "s", "exec")
    for body in ({**rec.body, "n_tokens": True}, {**rec.body, "extra": 1},
                 {k: v for k, v in rec.body.items() if k != "job_id"},
                 {**rec.body, "n_tokens": 1.0}):
        raw = json.dumps({**rec.to_dict(), "body": body}, sort_keys=True,
                         separators=(",", ":")).encode()
        with pytest.raises(ValidationError):
            SignedRecord.decode(raw)
        with pytest.raises(ValidationError):
            _json_path(raw)
    # an integer beyond 64 bits is valid JSON and a valid int: orjson cannot take it, json can
    raw = json.dumps({**rec.to_dict(), "body": {**rec.body, "n_tokens": 2**70}},
                     sort_keys=True, separators=(",", ":")).encode()
    assert SignedRecord.decode(raw).encode() == raw == _json_path(raw).encode()
    assert SignedRecord.decode(raw).typed_body().n_tokens == 2**70


def test_state_bytes_are_the_canonical_bytes() -> None:
    from ledger.votes import dumps_canonical, dumps_float_free

    values = [{"s": "".join(chr(c) for c in range(0x20)) + '"\\\x7f\u2028\ud7ff\U0001f600',
               "\U0001f600": 1, "\uffff": 2, "a": [2**63 - 1, -2**63, 2**64 - 1, None, True]},
              {"big": 2**70, "neg": -2**64}, [], {}, "x", 0]
    for value in values:
        assert dumps_float_free(value) == dumps_canonical(value)


def test_the_inbox_is_listed_again_only_when_it_changed(tmp_path: Path, world: World) -> None:
    a, b = world.join("a"), world.join("b")
    post(tmp_path, a)
    pool = Mempool(tmp_path)
    assert pool.refresh() == 1 and pool.listings == 1
    old = 1_000_000_000
    os.utime(tmp_path, ns=(old, old))  # settled long ago: a stat says "nothing new"
    assert pool.refresh() == 0 and pool.listings == 2  # the mtime moved: listed once more
    assert pool.refresh() == 0 and pool.listings == 2
    post(tmp_path, b)  # a post renames a file into the dir: its mtime moves
    assert pool.refresh() == 1 and pool.listings == 3
    os.utime(tmp_path, ns=(old, old))
    pool.refresh()
    listed = pool.listings
    (tmp_path / "STOP").touch()
    assert pool.changed() and pool.listings == listed
