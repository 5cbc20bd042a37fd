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
    DisputeVote,
    InferenceAssigned,
    JobAccepted,
    SignedRecord,
    escrow_authorization_bytes,
    evidence_digest,
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


# --- dispute votes ------------------------------------------------------------------------------

MEMBER = Identity.from_seed("dc-c", bytes(range(2, 34)))
EVIDENCE = {"binding_problems": [], "failed_requests": [f"{JOB}:1"],
            "worst": {"max_margin": 4.25, "passed": False}}


def _vote() -> SignedRecord:
    return sign_record(MEMBER, DisputeVote(JOB, f"{JOB}-uni-b", "uni-b", "ab" * 32, "cd" * 32,
                                           "ef" * 32, 3, 1, False, evidence_digest(EVIDENCE),
                                           EVIDENCE))


def test_evidence_digest_golden() -> None:
    assert canonical_bytes(EVIDENCE) == (
        b'{"binding_problems":[],"failed_requests":["job-0123456789abcdef:1"],'
        b'"worst":{"max_margin":4.25,"passed":false}}')
    assert evidence_digest(EVIDENCE) == \
        "0eb6e335db4bf715e23a47fe594a7f419ff675f1364d5221d9605e906221fb85"


def test_dispute_vote_golden_vector() -> None:
    rec = _vote()
    assert rec.encode() == (
        b'{"body":{"checked":3,"dispute_block":"' + b"ef" * 32 + b'","evidence":'
        b'{"binding_problems":[],"failed_requests":["job-0123456789abcdef:1"],"worst":'
        b'{"max_margin":4.25,"passed":false}},"evidence_sha256":"0eb6e335db4bf715e23a47fe594a7f'
        b'419ff675f1364d5221d9605e906221fb85","executor":"uni-b","failed":1,"job_id":'
        b'"job-0123456789abcdef","merkle_root":"' + b"ab" * 32 + b'","passed":false,'
        b'"sample_block":"' + b"cd" * 32 + b'","shard_id":"job-0123456789abcdef-uni-b"},'
        b'"kind":"dispute_vote","signature":"f123f58572391a1e496de335859a2e8aa664b4667cc8d5cf77e2'
        b'bd26683e891cb4301e38edfac24b0aed78cf6bc6d61ddce01b0877ffbccfdddb3ca0aa11ac00",'
        b'"signer":"dc-c","v":1}')
    assert rec.record_id == "e0f12a5df0201bc7f8f041a264165278cfa7accd53f17ca2c29579cac4935936"
    back = SignedRecord.decode(rec.encode())
    assert back == rec and back.typed_body() == rec.typed_body()
    back.verify(MEMBER.public_hex)


@pytest.mark.parametrize("mutate, field", [
    (lambda b: b.pop("evidence_sha256"), "body"),
    (lambda b: b.update(evidence_sha256=7), "body.evidence_sha256"),
    (lambda b: b.update(evidence=["not", "an", "object"]), "body.evidence"),
    (lambda b: b.update(passed="no"), "body.passed"),
    (lambda b: b.update(voter="dc-c"), "body"),
])
def test_malformed_dispute_votes_name_the_field(mutate, field) -> None:  # type: ignore[no-untyped-def]
    d = _vote().to_dict()
    d["body"] = dict(d["body"])
    mutate(d["body"])
    with pytest.raises(ValidationError) as exc:
        SignedRecord.from_dict(d)
    assert exc.value.field == field


def test_equivocation_evidence_golden_vector() -> None:
    """The evidence record and the vote bytes its signatures cover (ledger.votes)."""
    from gonka_hpc.records import EquivocationEvidence
    from ledger.votes import vote_bytes

    voter = Identity.from_seed("validator-1", bytes(range(2, 34)))
    assert vote_bytes("prevote", 7, 1, "ab" * 32) == (
        b'{"block_hash":"' + b"ab" * 32 + b'","height":7,"kind":"prevote","round":1,"v":1}')
    a = voter.sign(vote_bytes("prevote", 7, 1, "ab" * 32))
    b = voter.sign(vote_bytes("prevote", 7, 1, ""))  # a nil vote
    rec = sign_record(TA, EquivocationEvidence("validator-1", 7, 1, "prevote", "ab" * 32, a,
                                               "", b))
    assert rec.encode() == (
        b'{"body":{"block_hash_a":"' + b"ab" * 32 + b'","block_hash_b":"","height":7,"round":1,'
        b'"signature_a":"01df5ec2c4aab01fed5c884b2d3506546414554817b342c767b2777e06190810f2eb93'
        b'd3661ca47527de5d5c033e12401a1979df60810f7c56c5d941bc5f660c","signature_b":"9512bc25ef'
        b'b9f5e0bc63f8090d566c5a053c177f27c7440fd7b99af68bfc971a2fd10c3f9563416a18fa0b4daad2198'
        b'2a81910956c2472538177625c486ff405","step":"prevote","validator":"validator-1"},'
        b'"kind":"equivocation_evidence","signature":"657310c65c8fce35b18d472cce24bbeff4bd0f0962'
        b'0c363d1a35db4a31fc31526acde1b622918943de82673eb9d0ca8061e63c080edc8a2e6702f016707de40'
        b'4","signer":"uni-a","v":1}')
    assert rec.record_id == "517500d14a95b88159cc6a807c69378ac98989d46b3404f170d4d35cb563c4b2"
