"""Canonical bytes and signed records: golden vectors pin the encoding.

If one of these vectors changes, every signature on every chain changes with it: a change
here is a format version bump, never a refactor.
"""

from __future__ import annotations

import pytest

from gonka_hpc.canonical import canonical_bytes
from gonka_hpc.errors import SignatureError, ValidationError
from gonka_hpc.identity import Identity
from gonka_hpc.records import (
    InferenceAssigned,
    JobAccepted,
    SignedRecord,
    escrow_authorization_bytes,
    sign_record,
)

TA = Identity.from_seed("uni-a", bytes(range(32)))
CLIENT = Identity.from_seed("alice", bytes(range(1, 33)))
JOB = "job-0123456789abcdef"


def _job_record() -> SignedRecord:
    sig = CLIENT.sign(escrow_authorization_bytes(JOB, "uni-a", "ab" * 32, 1200))
    return sign_record(TA, JobAccepted(JOB, "alice", "uni-a", "ab" * 32, 3, 1200, sig))


def test_canonical_bytes_golden() -> None:
    value = {"b": [1, 2.5, None, True], "a": "é", "c": {"z": 0, "y": -1}}
    assert canonical_bytes(value) == b'{"a":"\xc3\xa9","b":[1,2.5,null,true],"c":{"y":-1,"z":0}}'


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), b"bytes", {1: "int key"}])
def test_canonical_rejects_ambiguous_values(bad: object) -> None:
    with pytest.raises((ValueError, TypeError)):
        canonical_bytes({"x": bad})


def test_ed25519_matches_rfc8032_vector_1() -> None:
    ident = Identity.from_seed("rfc", bytes.fromhex(
        "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60"))
    assert ident.public_hex == "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
    assert ident.sign(b"") == (
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e"
        "39701cf9b46bd25bf5f0595bbe24655141438e7a100b")


def test_job_accepted_golden_vector() -> None:
    rec = _job_record()
    assert rec.encode() == (
        b'{"body":{"client":"alice","client_signature":"5e393920664cb1f24e12c618e9895f215fb92e6010'
        b'cafffe73449503a9152db84f45b8e7f8b84289c9b0f19ec8691821ced4a1f61d13b1d2b056c5718c260a0f",'
        b'"escrow":1200,"job_hash":"' + b"ab" * 32 + b'","job_id":"job-0123456789abcdef",'
        b'"n_requests":3,"ta":"uni-a"},"kind":"job_accepted","signature":"3898b7bfe7c0c2c08f4ac7ba'
        b'8cf301089f919e2c045d86d4d6b457207da0cba421bb572ed4d3e7dd84c1b407faa691c0df407ca6bcc49d6c'
        b'88dd0d407a667005","signer":"uni-a","v":1}')
    assert rec.record_id == "5a0da83bdd8ca9d555bca8b9714c39107cf88eafffb52c22dc512cef1756422a"


def test_inference_assigned_golden_record_id() -> None:
    rec = sign_record(TA, InferenceAssigned(JOB, f"{JOB}-uni-b", "uni-b",
                                            (f"{JOB}:1", f"{JOB}:3"), 48, "cd" * 32, "ef" * 32))
    assert rec.record_id == "acc8c8ef4115a113cf7e1b1c593b5d18f1f983c85c0f45731b19172df22b305c"


def test_record_roundtrip_and_signature() -> None:
    rec = _job_record()
    back = SignedRecord.decode(rec.encode())
    assert back == rec
    back.verify(TA.public_hex)
    assert back.typed_body().escrow == 1200
    with pytest.raises(SignatureError):
        back.verify(CLIENT.public_hex)


def test_tampered_body_fails_signature() -> None:
    rec = _job_record()
    forged = SignedRecord(rec.kind, rec.signer, {**rec.body, "escrow": 1}, rec.signature)
    with pytest.raises(SignatureError):
        forged.verify(TA.public_hex)


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d.update(v=2), "v"),
    (lambda d: d.update(kind="mint_money"), "kind"),
    (lambda d: d["body"].pop("escrow"), "body"),
    (lambda d: d["body"].update(escrow="1200"), "body.escrow"),
    (lambda d: d.update(signature=5), "signature"),
])
def test_malformed_records_name_the_field(mutate, field) -> None:  # type: ignore[no-untyped-def]
    d = _job_record().to_dict()
    d["body"] = dict(d["body"])
    mutate(d)
    with pytest.raises(ValidationError) as exc:
        SignedRecord.from_dict(d)
    assert exc.value.field == field
