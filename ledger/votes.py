"""What validators sign in consensus: prevotes, precommits and proposals, as canonical bytes.

A vote is `{"v":1,"kind":"prevote"|"precommit","height","round","block_hash"}`; a nil vote
has `block_hash` "" (NIL). A precommit for a block is exactly the message commit certificates
hold, so a certificate is a set of precommit signatures. A proposal is
`{"v":1,"kind":"proposal","height","round","block_hash","valid_round"}`, signed by the round's
proposer. Two different signed votes by one validator for the same (height, round, kind) are
equivocation: the evidence record (`equivocation_evidence`) carries both signatures.

This module depends on nothing but the canonical encoding, so the state machine
(`ledger.state`) can check evidence without importing the block or consensus code.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import orjson

from gonka_hpc.canonical import canonical_bytes

VOTE_VERSION = 1
NIL = ""  # the block hash of a nil vote
PREVOTE, PRECOMMIT = "prevote", "precommit"
VOTE_STEPS = (PREVOTE, PRECOMMIT)


def vote_bytes(step: str, height: int, round_: int, block_hash: str) -> bytes:
    """What a validator signs to prevote or precommit `block_hash` (NIL: no block)."""
    if step not in VOTE_STEPS:
        raise ValueError(f"unknown vote step {step!r}")
    return canonical_bytes({"v": VOTE_VERSION, "kind": step, "height": height,
                            "round": round_, "block_hash": block_hash})


def proposal_bytes(height: int, round_: int, block_hash: str, valid_round: int) -> bytes:
    """What the proposer of (height, round) signs to propose a block."""
    return canonical_bytes({"v": VOTE_VERSION, "kind": "proposal", "height": height,
                            "round": round_, "block_hash": block_hash,
                            "valid_round": valid_round})


def dumps_canonical(value: Any) -> bytes:
    """`canonical_bytes` for values known to be canonical-encodable (JSON types, string keys,
    finite floats), without the per-node Python check: the C encoder does the work."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def dumps_float_free(value: Any) -> bytes:
    """`dumps_canonical` of a value without floats (the ledger state: integer arithmetic
    only), about ten times faster: for such values orjson's sorted-key encoding is byte for
    byte the canonical JSON (strings escape alike, keys sort alike by code point, integers
    print alike); integers beyond 64 bits make orjson refuse, and `json` encodes them.
    Never use it where a float may occur (orjson prints 1e-07 as 1e-7)."""
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    except TypeError:
        return dumps_canonical(value)


def _no_constants(name: str) -> Any:
    raise ValueError(f"non-finite number {name} is not canonical")


def decode_canonical(raw: bytes) -> tuple[Any, str]:
    """Parse canonical JSON bytes received from a peer; return (value, sha256 hex of raw).

    Raises ValueError unless `raw` is exactly the canonical encoding of the value, so the
    hash of the bytes is the hash of the value and nothing needs re-encoding in Python.
    """
    value = json.loads(raw, parse_constant=_no_constants)
    if dumps_canonical(value) != raw:
        raise ValueError("bytes are not in canonical form")
    return value, hashlib.sha256(raw).hexdigest()
