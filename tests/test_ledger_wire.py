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
    frames = garbage_frames(tmp_path, 5)
    kept = []
    for frame in frames:
        try:
            kept.append(wire.unpack(frame))
        except wire.WireError:
            continue
    # Only well-formed proposals and sync answers get through: their block bytes and chain
    # lines are judged (and refused) by the receiver, now or at the height they name.
    assert sorted(m[0] for m in kept) == ["B", "B", "B", "P", "P"]
    assert {m[1] for m in kept if m[0] == "P"} == {5, 6}
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
    (wire.encode(["Q", True]), "bad value"),
    (wire.encode(["Q", -1]), "bad value"),
    (wire.encode(["Q", 1.5]), "bad value"),
    (len(b'["Q",18446744073709551616]').to_bytes(4, "big") + b'["Q",18446744073709551616]',
     "bad value"),  # beyond 64 bits: orjson reads it as a float
    (wire.encode(["S", 1, "2"]), "bad value"),
    (wire.encode(["V", "prevote", 1, 0, None, 2, "00"]), "bad value"),
    (wire.encode(["P", 1, 0, -2, 0, "00", None]), "bad value"),
    (wire.encode(["P", 1, 0, -1, 0, "00", [1, "2"]]), "bad value"),
])
def test_malformed_frames_say_what_is_wrong(frame: bytes, why: str) -> None:
    with pytest.raises(wire.WireError, match=why):
        wire.unpack(frame)
    assert issubclass(wire.WireError, ValueError)
