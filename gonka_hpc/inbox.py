"""The client side of the validators' signed inbox: a directory of record files.

Anyone with a key drops a signed record as `<record_id>.json`, written atomically. Validators
(`ledger/`) pick records up, check signatures and state, and include them in blocks. The
record id is content-addressed, so dropping the same record twice is harmless.
"""

from __future__ import annotations

from pathlib import Path

from .fileutil import atomic_write_bytes
from .records import SignedRecord


def post(inbox: Path, record: SignedRecord) -> str:
    """Drop `record` in `inbox`; return its record id."""
    rid = record.record_id
    target = Path(inbox) / f"{rid}.json"
    if not target.exists():
        atomic_write_bytes(target, record.encode())
    return rid
