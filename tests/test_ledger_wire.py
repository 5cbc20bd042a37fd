"""The validators' wire format (ledger/wire.py): every consensus message survives a round trip
through bytes, and whatever is not a well-formed frame of a known message, a pickle included,
is refused with WireError (a ValueError, which the receiving rank logs and ignores)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from ledger import wire
from ledger.faults import garbage_frames

MESSAGES = [
    ("P", 7, 1, b'{"height":7,"records":[]}' * 100, -1, 2, "ab" * 64, [12, 40]),
    ("P", 7, 2, b"", 1, 3, "cd" * 64, None),
    ("V", "prevote", 7, 0, "ef" * 32, 1, "00" * 64),
    ("V", "precommit", 7, 3, "", 0, "11" * 64),
    ("S", 6, 2),
    ("Q", 5),
    ("B", [b'{"block":1}\n', b'{"block":2}\n']),
    ("B", []),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: m[0])
def test_every_message_survives_a_round_trip(msg: tuple[object, ...]) -> None:
    frame = wire.pack(msg)
    assert isinstance(frame, bytes)
    assert wire.unpack(frame) == msg


def test_a_block_travels_as_raw_bytes_not_json() -> None:
    block = bytes(range(256)) * 4096  # 1 MiB, not UTF-8, not JSON
    frame = wire.pack(("P", 1, 0, block, -1, 0, "ab" * 64, None))
    assert len(frame) < len(block) + 200 and frame.endswith(block)
    assert wire.unpack(frame)[3] == block


def test_garbage_and_pickles_are_refused_without_running_code(tmp_path: Path) -> None:
    frames = garbage_frames(tmp_path)
    refused = 0
    for frame in frames:
        try:
            msg = wire.unpack(frame)
        except wire.WireError:
            refused += 1
            continue
        assert msg[0] in ("V", "Q", "P", "B")  # well framed; the receiver rejects the fields
    assert refused >= 8
    assert not (tmp_path / "PWNED").exists()
    pickle.loads(frames[-1])  # what `comm.recv` would have done with the last one
    assert (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("frame, why", [
    (b"", "too short"),
    (b"\x00\x00\x00\x09[]", "runs past"),
    (b"\x00\x00\x00\x02{x", "not JSON"),
    (wire.encode([]), "starts with the message kind"),
    (wire.encode([1, 2]), "starts with the message kind"),
    (wire.encode(["V", "prevote", 1]), "header fields"),
    (wire.encode(["Q", 1], b"x"), "carries a payload"),
    (wire.encode(["X"]), "header fields"),
])
def test_malformed_frames_say_what_is_wrong(frame: bytes, why: str) -> None:
    with pytest.raises(wire.WireError, match=why):
        wire.unpack(frame)
    assert issubclass(wire.WireError, ValueError)
