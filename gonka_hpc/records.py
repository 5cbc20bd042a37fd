"""Signed ledger records: one frozen dataclass per kind, one canonical byte encoding.

A record travels as a `SignedRecord` envelope: kind, signer (an account name), body and an
ed25519 signature over `signing_bytes()`. The body is one of the dataclasses below; `body_of`
turns it back into its type and checks its fields. The ledger (validators) decides whether
the signer may say it; this module only fixes what the bytes are.

Records live in the core, not in `ledger/`, because executors, transfer agents and verifiers
make them and the core never imports `ledger`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

import orjson

from .canonical import canonical_bytes, sha256_hex
from .errors import ValidationError
from .identity import Identity, verify_signature

RECORD_VERSION = 1
_SIG_RE = re.compile(r"[0-9a-f]{128}")

# --- bodies ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParticipantJoined:
    """A cluster joins the network with a weight (its proven compute). Self-signed."""

    kind: ClassVar[str] = "participant_joined"
    participant: str
    pubkey: str  # hex ed25519 public key; must match the signer's registration
    weight: int  # relative compute weight, > 0


@dataclass(frozen=True)
class JobAccepted:
    """The transfer agent accepted a client's job and escrows its maximum price.

    `client_signature` is the client's signature over `escrow_authorization_bytes(...)`, so
    no TA can spend a client's funds without the client's consent.
    """

    kind: ClassVar[str] = "job_accepted"
    job_id: str
    client: str
    ta: str  # the TA's participant
    job_hash: str  # sha256 of the job file's bytes
    n_requests: int  # valid requests (bad lines are answered with errors, never run)
    escrow: int  # units taken from the client into escrow
    client_signature: str


@dataclass(frozen=True)
class InferenceAssigned:
    """One shard of a job assigned to one executor. `block_hash` is the randomness used."""

    kind: ClassVar[str] = "inference_assigned"
    job_id: str
    shard_id: str
    executor: str
    request_ids: tuple[str, ...]
    max_tokens_total: int  # Σ max_tokens of the shard: the most its commit may bill
    shard_hash: str  # sha256 of the shard file as written to the executor's spool
    block_hash: str  # last finalized block hash the choice and seeds were derived from


@dataclass(frozen=True)
class ArtifactBatchCommitted:
    """An executor commits one HDF5 artifact batch by its Merkle root (one record per shard)."""

    kind: ClassVar[str] = "artifact_batch_committed"
    job_id: str
    shard_id: str
    executor: str
    merkle_root: str
    n_requests: int
    n_tokens: int  # generated tokens in the batch
    model_hash: str
    file_sha256: str


@dataclass(frozen=True)
class OutputDelivered:
    """The TA delivered the job's output file to the client."""

    kind: ClassVar[str] = "output_delivered"
    job_id: str
    output_sha256: str
    n_lines: int
    n_errors: int


@dataclass(frozen=True)
class Verdict:
    """A verifier's signed judgement of one artifact batch, with its evidence summary."""

    kind: ClassVar[str] = "verdict"
    job_id: str
    shard_id: str
    executor: str
    merkle_root: str
    sample_block: str  # the finalized block hash the sample and the verifier were drawn from
    checked: int  # inferences re-scored
    failed: int  # inferences that failed a check
    passed: bool
    evidence: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DisputeVote:
    """A dispute panel member's signed re-check of a batch whose verdict failed.

    A failing verdict opens a dispute; the panel is drawn from `dispute_block`, the hash of the
    block holding that verdict (`gonka_hpc.randomness.choose_panel`). Each member re-runs the
    same check on the same sample (`sample_block`) and votes; more than 2/3 of the panel's
    weight decides. `evidence_sha256` is `evidence_digest(evidence)`, so the evidence can be
    quoted and compared by its digest alone.
    """

    kind: ClassVar[str] = "dispute_vote"
    job_id: str
    shard_id: str
    executor: str
    merkle_root: str
    sample_block: str  # the batch's sample block (the block holding its commit)
    dispute_block: str  # the hash of the block holding the failing verdict: the panel's draw
    checked: int  # inferences re-scored
    failed: int  # inferences that failed a check
    passed: bool
    evidence_sha256: str  # sha256 of the canonical bytes of `evidence`
    evidence: dict[str, Any] = field(default_factory=dict)


def evidence_digest(evidence: dict[str, Any]) -> str:
    """sha256 (hex) of an evidence summary's canonical bytes (what a dispute vote names)."""
    return sha256_hex(canonical_bytes(evidence))


@dataclass(frozen=True)
class EquivocationEvidence:
    """A validator signed two different votes for one (height, round, step): both signatures.

    Reported (signed) by the validator that saw both; `ledger.votes.vote_bytes` is what each
    signature covers ("" is a nil vote). Accountability only: the ledger records who
    equivocated, once per offence.
    """

    kind: ClassVar[str] = "equivocation_evidence"
    validator: str  # the accused genesis validator
    height: int
    round: int
    step: str  # "prevote" or "precommit"
    block_hash_a: str  # one vote ("" for nil) ...
    signature_a: str
    block_hash_b: str  # ... and the other, for a different block hash
    signature_b: str


@dataclass(frozen=True)
class EpochClose:
    """Ends the epoch: the block that holds it applies verdicts and settles rewards."""

    kind: ClassVar[str] = "epoch_close"
    epoch: int


BODY_TYPES: dict[str, type] = {t.kind: t for t in (  # type: ignore[attr-defined]
    ParticipantJoined, JobAccepted, InferenceAssigned, ArtifactBatchCommitted, OutputDelivered,
    Verdict, DisputeVote, EpochClose, EquivocationEvidence)}


def escrow_authorization_bytes(job_id: str, ta: str, job_hash: str, escrow: int) -> bytes:
    """What a client signs to let `ta` escrow `escrow` units for the job."""
    return canonical_bytes({"v": RECORD_VERSION, "kind": "escrow_authorization", "job_id": job_id,
                            "ta": ta, "job_hash": job_hash, "escrow": escrow})


def _body_dict(body: Any) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(body):
        value = getattr(body, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


_FIELD_TYPES = {"int": int, "str": str, "bool": bool}


@functools.cache
def _body_spec(cls: type) -> tuple[frozenset[str], tuple[str, ...], tuple[str, ...],
                                   tuple[tuple[str, type], ...]]:
    """(the set of field names, field names, required names, (name, type) of the
    int/str/bool fields) of a body class, in field order: worked out once per class, not
    once per record."""
    fields = dataclasses.fields(cls)
    names = tuple(f.name for f in fields)
    required = tuple(f.name for f in fields if f.default is dataclasses.MISSING
                     and f.default_factory is dataclasses.MISSING)
    typed = tuple((f.name, _FIELD_TYPES[f.type]) for f in fields  # type: ignore[index]
                  if f.type in _FIELD_TYPES)
    return frozenset(names), names, required, typed


def _body_from_dict(kind: str, data: dict[str, Any]) -> Any:
    cls = BODY_TYPES.get(kind)
    if cls is None:
        raise ValidationError(f"unknown record kind {kind!r}", field="kind")
    name_set, names, required, typed = _body_spec(cls)
    complete = data.keys() == name_set  # every field given: the common case, one compare
    if complete and len(typed) == len(names):  # only int/str/bool fields: check exact types
        for name, want in typed:  # (anything else, a bool for an int included, is judged
            if type(data[name]) is not want:  # by the full check below)
                break
        else:
            body = object.__new__(cls)
            body.__dict__.update(data)
            return body
    if not complete:
        missing = [n for n in required if n not in data]
        extra = sorted(set(data).difference(names))
        if missing or extra:
            what = f"missing {missing}" if missing else f"unexpected {extra}"
            raise ValidationError(f"{kind} body: {what}", field="body")
    if "request_ids" in data and not (isinstance(data["request_ids"], list) and all(
            isinstance(r, str) for r in data["request_ids"])):
        raise ValidationError(f"{kind} body: expected a list of strings",
                              field="body.request_ids")
    if "evidence" in data and not isinstance(data["evidence"], dict):
        raise ValidationError(f"{kind} body: expected an object", field="body.evidence")
    kwargs = dict(data)
    if "request_ids" in kwargs:
        kwargs["request_ids"] = tuple(kwargs["request_ids"])
    for name, want in typed:
        if name in kwargs:
            v = kwargs[name]
            if type(v) is not want and (not isinstance(v, want)
                                        or (want is int and isinstance(v, bool))):
                raise ValidationError(f"{kind} body: expected {want.__name__}, got {v!r}",
                                      field=f"body.{name}")
    if complete:  # what the frozen dataclass's __init__ does (no defaults, no
        body = object.__new__(cls)  # __post_init__), without one __setattr__ per field
        body.__dict__.update(kwargs)
        return body
    return cls(**kwargs)


# --- envelope -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SignedRecord:
    """A record body, its signer's name and the signer's ed25519 signature (hex)."""

    kind: str
    signer: str
    body: dict[str, Any]
    signature: str

    def signing_bytes(self) -> bytes:
        """What the signature covers: the canonical record without its "signature" key. A
        record decoded from canonical bytes cuts them out of those bytes (keys are sorted:
        body, kind, signature, signer, v) instead of encoding the body again."""
        enc = self.__dict__.get("_canonical")
        if enc is not None:  # the last match is the key itself: inside a JSON string every
            cut = b',"signature":"' + self.signature.encode() + b'"'  # quote is escaped
            i = enc.rfind(cut + b',"signer":')
            if i > 0:
                return enc[:i] + enc[i + len(cut):]
        return signing_bytes(self.kind, self.signer, self.body)

    def to_dict(self) -> dict[str, Any]:
        return {"v": RECORD_VERSION, "kind": self.kind, "signer": self.signer,
                "body": self.body, "signature": self.signature}

    def encode(self) -> bytes:
        """Canonical bytes of the whole signed record (what blocks hold and hash)."""
        enc = self.__dict__.get("_canonical")  # set by from_dict when it encoded the record
        return enc if enc is not None else canonical_bytes(self.to_dict())

    @property
    def record_id(self) -> str:
        """sha256 (hex) of the canonical bytes; a record is immutable: hashed once."""
        rid = self.__dict__.get("_record_id")
        if rid is None:
            rid = self.__dict__["_record_id"] = sha256_hex(self.encode())
        return rid  # type: ignore[no-any-return]

    def typed_body(self) -> Any:
        """The body as its dataclass, checked (once: a record is immutable)."""
        typed = self.__dict__.get("_typed")
        if typed is None:
            typed = self.__dict__["_typed"] = _body_from_dict(self.kind, self.body)
        return typed

    def verify(self, public_hex: str) -> None:
        """Raise SignatureError unless the signature is `public_hex`'s over this record."""
        verify_signature(public_hex, self.signing_bytes(), self.signature)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, from_json: bool = False,
                  canonical: bytes | None = None) -> SignedRecord:
        """The record in `data`, checked. `from_json`: `data` comes straight from
        `json.loads` (string keys only), so the C encoder's checks (finite numbers, JSON
        types) are all the canonical check needs. `canonical`: the canonical bytes of `data`
        when the caller has checked them (`decode`), so nothing is encoded again."""
        if not isinstance(data, dict):
            raise ValidationError("record must be a JSON object")
        if data.get("v") != RECORD_VERSION:
            raise ValidationError(f"unsupported record version {data.get('v')!r}", field="v")
        kind, signer, signature = data.get("kind"), data.get("signer"), data.get("signature")
        if not (isinstance(kind, str) and isinstance(signer, str)
                and isinstance(signature, str)):
            for key in ("kind", "signer", "signature"):
                if not isinstance(data.get(key), str):
                    raise ValidationError("missing or not a string", field=key)
        if not isinstance(data.get("body"), dict):
            raise ValidationError("missing or not an object", field="body")
        if not _SIG_RE.fullmatch(signature):
            raise ValidationError("not 128 lower-case hex digits (an ed25519 signature)",
                                  field="signature")
        try:
            if canonical is not None:
                enc = canonical
            else:
                enc = _dumps_json(data) if from_json else canonical_bytes(data)
        except (ValueError, TypeError) as exc:
            raise ValidationError(f"not canonically encodable: {exc}", field="body") from None
        rec = object.__new__(cls)  # the frozen dataclass's __init__, without its
        d = rec.__dict__  # one object.__setattr__ per field
        d["kind"], d["signer"], d["body"], d["signature"] = kind, signer, data["body"], signature
        if len(data) == 5 and type(data["v"]) is int:  # `enc` is the record's encoding
            d["_canonical"] = enc
        rec.typed_body()  # validates kind and fields
        return rec

    @classmethod
    def decode(cls, raw: bytes) -> SignedRecord:
        """The record encoded in `raw` (JSON), checked. Canonical bytes (what posters write)
        take the fast path: orjson parses them and its re-encoding confirms they are canonical
        (`_is_canonical_raw`); anything else is parsed by `json` as before."""
        raw = bytes(raw)
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass
        else:
            if isinstance(data, dict) and _is_canonical_raw(data, raw):
                return cls.from_dict(data, from_json=True, canonical=raw)
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValidationError(f"record is not JSON: {exc}") from None
        return cls.from_dict(data, from_json=True)


def _is_canonical_raw(data: dict[str, Any], raw: bytes) -> bool:
    """Whether `raw`, which orjson parsed to the record dict `data`, is exactly
    `canonical_bytes(data)`. orjson's sorted-key encoding equals the canonical one for JSON
    without floats and without string escapes: no backslash in `raw` means no escapes, and a
    record body without `evidence` holds only ints, strings, booleans and lists of strings
    once `typed_body` accepts it (a record it refuses is rejected, whatever its bytes). Big
    integers come back from orjson as floats and never re-encode to `raw`."""
    body = data.get("body")
    return (isinstance(body, dict) and "evidence" not in body and b"\\" not in raw
            and orjson.dumps(data, option=orjson.OPT_SORT_KEYS) == raw)


def _dumps_json(value: Any) -> bytes:
    """`canonical_bytes` of a value decoded by `json.loads` (string keys, JSON types only),
    checked by the C encoder alone (non-finite numbers raise ValueError)."""
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                          allow_nan=False).encode("utf-8")
    except ValueError:  # the only ValueError of a decoded value: NaN or Infinity
        raise ValueError("non-finite float (NaN or Infinity) is not canonical") from None


def signing_bytes(kind: str, signer: str, body: dict[str, Any]) -> bytes:
    return canonical_bytes({"v": RECORD_VERSION, "kind": kind, "signer": signer, "body": body})


def sign_record(identity: Identity, body: Any) -> SignedRecord:
    """Sign a body dataclass as `identity`."""
    data = _body_dict(body)
    kind = type(body).kind
    return SignedRecord(kind, identity.name, data,
                        identity.sign(signing_bytes(kind, identity.name, data)))
