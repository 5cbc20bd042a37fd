"""TEST-ONLY fault injection: make chosen validator ranks misbehave on purpose.

`python -m ledger run --fault-injection FILE` reads a JSON object mapping rank -> behaviour:

    {"1": {"behaviour": "equivocate", "from_height": 2, "until_height": 4},
     "2": {"behaviour": "silent", "from_height": 3, "seconds": 4},
     "3": {"behaviour": "invalid-proposal"}}

Behaviours (active while the rank's next height is in [from_height, until_height), default
from 1 and forever):
- `silent`: the rank sends nothing and drops every message it receives, for `seconds` after it
  first becomes active (default: forever); afterwards it behaves again and catches up.
- `withhold`: never sends its prevotes and precommits (it still proposes and syncs).
- `equivocate`: every vote it sends is followed by a second, conflicting vote for the same
  (height, round, step), both signed: a double-sign every honest validator sees.
- `split-vote`: each vote it sends goes to the even ranks, and a conflicting one, also
  signed, to the odd ranks: a double-sign no honest validator sees both halves of unless
  votes are relayed.
- `garbage`: besides its honest messages, sends every peer malformed frames once per height
  (bytes that are no frame, a header that is not JSON, messages of the wrong shape or types)
  and a pickle that would create INBOX/PWNED if anyone unpickled it (`garbage_frames`).
- `invalid-proposal`: as proposer, proposes blocks whose state_hash is wrong.
- `raise`: raises at the start of height `from_height` (a crashing rank).

Honest validators never read this file; it exists so that the fault tests exercise real
processes. Never use it in production: a rank that runs it is Byzantine by construction.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gonka_hpc.errors import ValidationError

from . import wire

BEHAVIOURS = ("silent", "withhold", "equivocate", "split-vote", "garbage",
              "invalid-proposal", "raise")


@dataclass
class Fault:
    """One rank's injected misbehaviour."""

    behaviour: str
    from_height: int = 1
    until_height: float = math.inf
    seconds: float = math.inf  # silent only
    _since: float | None = None

    def active(self, height: int) -> bool:
        """Whether the fault applies while deciding `height`."""
        if not self.from_height <= height < self.until_height:
            return False
        if self.behaviour != "silent":
            return True
        now = time.monotonic()
        if self._since is None:
            self._since = now
        return now - self._since < self.seconds


class _Touch:
    """Unpickling this creates a file: what a pickled message from a Byzantine rank could do
    to a receiver that unpickles (the ledger never does: `ledger.wire`)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.path,))


def garbage_frames(inbox: Path, height: int) -> list[bytes]:
    """The bytes a `garbage` rank sends while deciding `height`: each must be refused as a
    bad message, now or when the receiver reaches the height it names."""
    import pickle  # (faults are test-only: the ledger itself never imports pickle)

    sig = "00" * 64
    return [
        b"", b"\x00\x00", b"\xff\xff\xff\xff{}", b"\x00\x00\x00\x03{x}",
        wire.encode({"not": "a list"}),  # type: ignore[arg-type]
        wire.encode(["V", "prevote"]), wire.encode(["V", "prevote", "x", 0, "", 0, sig]),
        wire.encode(["V", "prevote", height, True, "", 0, sig]),
        wire.encode(["Q", "not a height"]), wire.encode(["S", height, 2], b"payload"),
        wire.encode(["Z"]),
        # well-formed frames whose contents are bad: judged now, or kept for the next
        # height and judged when the receiver gets there
        wire.encode(["P", height, 0, -1, 0, sig, [5]], b"not a block"),
        wire.encode(["P", height + 1, 0, -1, 0, sig, None], b"not a block either"),
        wire.encode(["B"], b"not a chain line\n"),
        wire.encode(["B"], b'{"block":{"v":1,"height":1e400},"hash":"","certificate":[]}\n'),
        wire.encode(["B"], b"[" * 100_000 + b"\n"),
        pickle.dumps(("V", _Touch(inbox / "PWNED"))),
    ]


def load_faults(path: Path | None) -> dict[int, Fault]:
    """{rank: Fault} from a fault-injection file (empty without one)."""
    if path is None:
        return {}
    try:
        raw: Any = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValidationError(f"cannot read fault-injection file: {exc}", file=str(path)) \
            from None
    if not isinstance(raw, dict):
        raise ValidationError("expected an object {rank: {behaviour: ...}}", file=str(path))
    out: dict[int, Fault] = {}
    for key, spec in raw.items():
        where = f"[{key!r}]"
        if not str(key).isdigit() or not isinstance(spec, dict):
            raise ValidationError("keys are rank numbers, values objects", file=str(path),
                                  field=where)
        if spec.get("behaviour") not in BEHAVIOURS:
            raise ValidationError(f"behaviour must be one of {BEHAVIOURS}, got "
                                  f"{spec.get('behaviour')!r}", file=str(path),
                                  field=f"{where}.behaviour")
        extra = set(spec) - {"behaviour", "from_height", "until_height", "seconds"}
        if extra:
            raise ValidationError(f"unknown keys {sorted(extra)}", file=str(path), field=where)
        try:
            out[int(key)] = Fault(spec["behaviour"], int(spec.get("from_height", 1)),
                                  float(spec.get("until_height", math.inf)),
                                  float(spec.get("seconds", math.inf)))
        except (TypeError, ValueError) as exc:
            raise ValidationError(f"bad number: {exc}", file=str(path), field=where) from None
    return out
