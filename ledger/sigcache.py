"""Signatures already verified, remembered, so each validator verifies each record once.

ed25519 verification is the ledger's physical limit (about 9,300 per second per core), and a
record's signature is looked at more than once: when a validator pre-checks its inbox while
it waits for a proposal, when the proposer tries records on a trial state, when a block is
checked. `record_signed_by` remembers on the record object itself the key that verified it
(records are immutable; a validator holds one object per record). `is_valid_signature` (votes,
evidence, escrow authorizations) verifies a (public key, message, signature) triple once and
remembers only successes, keyed by the sha256 of all three, so a hit is exactly as strong as
a verification. Bounded (oldest forgotten first); per process, nothing on disk. Public keys
are parsed once.
"""

from __future__ import annotations

import hashlib

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from gonka_hpc.identity import is_valid_signature as _verify
from gonka_hpc.records import SignedRecord

MAX_ENTRIES = 500_000
MAX_KEYS = 10_000
_ok: dict[bytes, None] = {}  # insertion-ordered: the first key is the oldest
_keys: dict[str, Ed25519PublicKey | None] = {}  # public key hex -> key (None: not a key)


def _key(public_hex: str, message: bytes, signature_hex: str) -> bytes:
    h = hashlib.sha256(public_hex.encode())
    h.update(b"\0" + signature_hex.encode() + b"\0")
    h.update(message)
    return h.digest()


def is_valid_signature(public_hex: str, message: bytes, signature_hex: str) -> bool:
    """`gonka_hpc.identity.is_valid_signature`, remembering the triples that verified."""
    key = _key(public_hex, message, signature_hex)
    if key in _ok:
        return True
    if not _verify(public_hex, message, signature_hex):
        return False
    _ok[key] = None
    if len(_ok) > MAX_ENTRIES:
        del _ok[next(iter(_ok))]
    return True


def _public_key(public_hex: str) -> Ed25519PublicKey | None:
    """The key object of a hex public key (parsed once per key; signers are few)."""
    try:
        return _keys[public_hex]
    except KeyError:
        pass
    try:
        pub: Ed25519PublicKey | None = Ed25519PublicKey.from_public_bytes(
            bytes.fromhex(public_hex))
    except (ValueError, TypeError):
        pub = None
    if len(_keys) >= MAX_KEYS:
        _keys.clear()
    _keys[public_hex] = pub
    return pub


def record_signed_by(public_hex: str, record: SignedRecord) -> bool:
    """Whether `record`'s signature verifies under `public_hex`. The record object remembers
    the key that verified it (a record is immutable), so asking again costs one lookup. A
    validator keeps one object per record: the mempool's, which blocks reuse (matched by
    record id, that is by canonical bytes)."""
    if record.__dict__.get("_signed_by") == public_hex:
        return True
    pub = _public_key(public_hex)
    if pub is None:
        return False
    try:
        pub.verify(bytes.fromhex(record.signature), record.signing_bytes())
    except (InvalidSignature, ValueError):
        return False
    record.__dict__["_signed_by"] = public_hex
    return True


def clear() -> None:
    _ok.clear()
    _keys.clear()
