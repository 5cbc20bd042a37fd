"""The bytes validator ranks send each other: JSON headers and raw payloads, never pickle.

mpi4py's lowercase `send`/`recv` pickle Python objects, and unpickling runs whatever code the
sender chose: a single Byzantine rank would take over every honest one, which is exactly
what the ledger must survive. So every message is one frame of bytes, sent and received as
an `MPI.BYTE` buffer (`Isend` / `Iprobe` + `Recv`):

    frame = header length (4 bytes, big-endian) + header + payload
    header = a JSON array of strings, ints, lists of ints and nulls (orjson)
    payload = raw bytes: a proposed block's canonical bytes, or chain.log lines

A frame that does not parse raises `WireError` (a ValueError), which the receiver treats as
a bad message from that rank: it is logged and ignored, like any other garbage.
"""

from __future__ import annotations

import struct
from typing import Any

import orjson

_LEN = struct.Struct(">I")


class WireError(ValueError):
    """Bytes from a peer that are not a frame, or not the message they claim to be."""


def encode(header: list[Any], payload: bytes = b"") -> bytes:
    head = orjson.dumps(header)
    return _LEN.pack(len(head)) + head + payload


def decode(frame: bytes) -> tuple[list[Any], bytes]:
    """(header, payload) of a frame; WireError if it is not one."""
    if len(frame) < _LEN.size:
        raise WireError(f"a frame of {len(frame)} bytes is too short")
    (n,) = _LEN.unpack_from(frame)
    if _LEN.size + n > len(frame):
        raise WireError(f"header length {n} runs past the frame ({len(frame)} bytes)")
    try:
        header = orjson.loads(frame[_LEN.size:_LEN.size + n])
    except orjson.JSONDecodeError as exc:
        raise WireError(f"header is not JSON: {exc}") from None
    if not isinstance(header, list) or not header or not isinstance(header[0], str):
        raise WireError("header is not a list that starts with the message kind")
    return header, frame[_LEN.size + n:]


def pack(msg: tuple[Any, ...]) -> bytes:
    """The frame of a consensus message tuple (see `ledger.consensus`): a proposal's block
    bytes and a sync answer's chain lines go in the payload, everything else in the header."""
    kind = msg[0]
    if kind == "P":  # ("P", height, round, block bytes, valid_round, index, signature, lengths)
        return encode(["P", msg[1], msg[2], *msg[4:]], bytes(msg[3]))
    if kind == "B":  # ("B", [chain.log lines, each ending with a newline])
        return encode(["B"], b"".join(msg[1]))
    return encode(list(msg))


def _nat(x: Any) -> bool:
    return type(x) is int and x >= 0


def _lengths(x: Any) -> bool:
    return x is None or (type(x) is list and all(type(n) is int for n in x))


def _str(x: Any) -> bool:
    return type(x) is str


# The header fields of each message after its kind, each with its check: a message of the
# right shape and types is all `unpack` lets through (what the values mean is judged where
# they are used), so a mistyped one is refused here and never kept for later.
_FIELDS = {
    "P": (_nat, _nat, lambda x: type(x) is int and x >= -1, _nat, _str, _lengths),
    "V": (_str, _nat, _nat, _str, _nat, _str),
    "S": (_nat, _nat),
    "Q": (_nat,),
    "B": (),
}


def unpack(frame: bytes) -> tuple[Any, ...]:
    """The message tuple of a frame from a peer; WireError if it is not a known message
    with fields of the right types (heights, rounds and indexes ints ≥ 0, valid_round ≥ -1,
    hashes, steps and signatures strings, record lengths a list of ints or null)."""
    header, payload = decode(frame)
    kind = header[0]
    checks = _FIELDS.get(kind)
    if checks is None or len(checks) + 1 != len(header):
        raise WireError(f"message {kind!r} with {len(header)} header fields")
    for i, (check, value) in enumerate(zip(checks, header[1:]), 1):
        if not check(value):
            raise WireError(f"message {kind!r}: field {i} has a bad value {value!r:.40}")
    if kind == "P":
        return ("P", header[1], header[2], payload, *header[3:])
    if kind == "B":
        return ("B", payload.splitlines(keepends=True))
    if payload:
        raise WireError(f"message {kind!r} carries a payload")
    return tuple(header)
