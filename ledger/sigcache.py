"""Signatures already verified, remembered, so each validator verifies each record once.

ed25519 verification is the ledger's physical limit (about 9,300 per second per core), and a
record's signature is looked at more than once: when a validator pre-checks its inbox while
it waits for a proposal, when the proposer tries records on a trial state, when a block is
checked. `is_valid_signature` verifies a (public key, message, signature) triple once and
remembers only successes, keyed by the sha256 of all three, so a hit is exactly as strong as
a verification. Bounded (oldest forgotten first); per process, nothing on disk.
"""

from __future__ import annotations

import hashlib

from gonka_hpc.identity import is_valid_signature as _verify
from gonka_hpc.records import SignedRecord

MAX_ENTRIES = 500_000
_ok: dict[bytes, None] = {}  # insertion-ordered: the first key is the oldest


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


def record_signed_by(public_hex: str, record: SignedRecord,
                     signing_bytes: bytes | None = None) -> bool:
    """Whether `record`'s signature verifies under `public_hex`. A record id fixes its signing
    bytes and its signature, so (key, record id) stands for the whole triple: a record seen
    again costs no encoding at all. `signing_bytes`, if given, must be the record's (a wrong
    one only makes this return False, and nothing is remembered)."""
    key = hashlib.sha256(f"{public_hex}\0record\0{record.record_id}".encode()).digest()
    if key in _ok:
        return True
    message = record.signing_bytes() if signing_bytes is None else signing_bytes
    if not is_valid_signature(public_hex, message, record.signature):
        return False
    _ok[key] = None
    return True


def clear() -> None:
    _ok.clear()
