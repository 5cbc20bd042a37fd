"""Canonical bytes for everything that is hashed or signed.

Never sign `json.dumps` of whatever dict is at hand: every signed structure goes through
`canonical_bytes`, which is JSON with sorted keys, no whitespace, UTF-8, and no floats that
are not finite. Byte strings must be hex-encoded by the caller, so the encoding has exactly one
form per value. Golden vectors in tests/test_canonical.py pin these bytes.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

ENCODING_VERSION = 1


def _check(value: Any, path: str) -> None:
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"non-finite float at {path or '<root>'}: {value!r}")
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check(item, f"{path}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"non-string key at {path or '<root>'}: {key!r}")
            _check(item, f"{path}.{key}" if path else key)
        return
    raise TypeError(f"cannot encode {type(value).__name__} at {path or '<root>'} canonically")


def canonical_bytes(value: Any) -> bytes:
    """The one byte encoding of a JSON-like value: sorted keys, no spaces, UTF-8."""
    _check(value, "")
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def canonical_hash(value: Any) -> str:
    """sha256 (hex) of the canonical bytes of `value`."""
    return sha256_hex(canonical_bytes(value))
