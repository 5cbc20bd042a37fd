"""The signed inbox as one validator sees it: records read once, kept in memory, in order.

The inbox is a directory every validator can read (one machine, or a shared file system).
A file `<name>.json` holds one signed record (as `gonka_hpc.inbox.post` writes it); a file
`<name>.jsonl` holds many, one per line (what a high-rate poster writes). Files are ordered
by (mtime_ns, name), lines by their position, so a record posted after the one it depends
on comes after it. Names starting with "." are posts in progress and are skipped.

Each validator scans the directory for files it has not read yet (`refresh`), decodes each
record once, and keeps it until it is final (`resolve`: single files move to
INBOX/committed/, a bundle once all its records are final or rejected) or can never be
valid (`reject`: single files move to INBOX/rejected/ with a NAME.reason file beside them;
a bundle's bad record is written there as `<record_id>.json` with its reason). Several
validators may move the same file: a move that finds the file gone is fine.
"""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from gonka_hpc.canonical import sha256_hex
from gonka_hpc.errors import GonkaError
from gonka_hpc.fileutil import atomic_write_bytes, atomic_write_text
from gonka_hpc.records import SignedRecord

REJECTED_DIR = "rejected"
COMMITTED_DIR = "committed"
SETTLED_NS = 100_000_000  # a dir mtime older than this is not hiding a change in its tick
RELIST_S = 1.0  # list the dir at least this often anyway (clocks of a shared file system)


def describe(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, GonkaError) else f"{type(exc).__name__}: {exc}"


def _move(path: Path, subdir: str) -> Path:
    target = path.parent / subdir / path.name
    target.parent.mkdir(exist_ok=True)
    try:
        path.replace(target)
    except FileNotFoundError:
        pass
    return target


def reject_file(path: Path, reason: str) -> None:
    """Move a record file that can never be valid to INBOX/rejected/, NAME.reason beside it."""
    target = _move(path, REJECTED_DIR)
    atomic_write_text(target.with_name(target.name + ".reason"), reason + "\n")


@dataclass(slots=True)
class Entry:
    """One pending record and where it came from."""

    rid: str
    record: SignedRecord
    raw: bytes  # the bytes it was read from
    path: Path
    bundle: bool  # from a .jsonl file
    pending: set[str] | None = None  # its bundle's records not resolved yet (shared set)


class Mempool:
    """Pending records of one validator, read from the inbox dir."""

    def __init__(self, inbox: Path) -> None:
        self.inbox = Path(inbox)
        self.entries: dict[str, Entry] = {}  # insertion order = inbox order
        self._seen: set[str] = set()  # file names already read
        self._bundles: dict[Path, set[str]] = {}  # bundle -> record ids not resolved yet
        self.version = 0  # grows whenever entries are added
        self.unverified: deque[str] = deque()  # record ids whose signature nobody checked yet
        self._listed: int | None = None  # the dir's mtime (ns) when it was last listed
        self._listed_at = 0.0  # and when (monotonic)
        self.listings = 0  # how many times the dir was listed

    def __len__(self) -> int:
        return len(self.entries)

    def refresh(self) -> int:
        """Read files that appeared since the last call; return how many records were added.
        The directory is listed only when its mtime says it may have changed (`changed`)."""
        if not self.changed():
            return 0
        self.listings += 1
        found = []
        try:
            with os.scandir(self.inbox) as it:
                for d in it:
                    name = d.name
                    if name in self._seen or name.startswith(".") or not d.is_file():
                        continue
                    if not (name.endswith(".json") or name.endswith(".jsonl")):
                        continue
                    try:
                        found.append((d.stat().st_mtime_ns, name))
                    except FileNotFoundError:
                        continue
        except FileNotFoundError:
            return 0
        added = 0
        for _, name in sorted(found):
            path = self.inbox / name
            try:
                raw = path.read_bytes()
            except FileNotFoundError:
                continue  # moved by another validator meanwhile
            except OSError:
                self._listed = None  # unreadable now: try again on the next scan
                continue
            self._seen.add(name)
            if name.endswith(".jsonl"):
                added += self._add_bundle(path, raw)
            else:
                added += self._add(path, raw, bundle=None)
        if added:
            self.version += 1
        return added

    def changed(self) -> bool:
        """Whether the inbox dir may hold news since it was last listed: its mtime moved
        (a file posted, renamed or moved away changes it), or it was set so recently that a
        change in the same clock tick could hide behind it (file systems stamp with a
        coarse clock), or a file could not be read last time. One stat, not a listing."""
        try:
            mtime = os.stat(self.inbox).st_mtime_ns
        except FileNotFoundError:
            return False
        now = time.monotonic()
        if (mtime == self._listed and time.time_ns() - mtime > SETTLED_NS
                and now - self._listed_at < RELIST_S):
            return False
        self._listed = mtime  # read before listing: a change while we list shows next time
        self._listed_at = now
        return True

    def _add(self, path: Path, raw: bytes, *, bundle: set[str] | None) -> int:
        """Add the record in `raw`; `bundle` is the pending-id set of the .jsonl file it is a
        line of (None for a single .json file)."""
        try:
            rec = SignedRecord.decode(raw)  # keeps its canonical bytes: its id is their hash
            rid = rec.record_id
        except Exception as exc:  # noqa: BLE001 - any undecodable record, whatever the error
            if bundle is not None:
                self._reject_bytes(path, raw, f"undecodable record: {describe(exc)}")
            else:
                reject_file(path, f"undecodable record: {describe(exc)}")
            return 0
        if rid in self.entries:
            if bundle is None:
                _move(path, COMMITTED_DIR)  # the same record twice: one copy is enough
            return 0
        self.entries[rid] = Entry(rid, rec, raw, path, bundle is not None, bundle)
        self.unverified.append(rid)
        if bundle is not None:
            bundle.add(rid)
        return 1

    def _add_bundle(self, path: Path, raw: bytes) -> int:
        ids = self._bundles.setdefault(path, set())
        added = 0
        for line in raw.split(b"\n"):
            if line and not line.isspace():  # (what `line.strip()` tells, without a copy)
                added += self._add(path, line, bundle=ids)
        self._maybe_finish(path)
        return added

    def _reject_bytes(self, bundle: Path, raw: bytes, reason: str) -> None:
        target = bundle.parent / REJECTED_DIR / f"{sha256_hex(raw)}.json"
        target.parent.mkdir(exist_ok=True)
        atomic_write_bytes(target, raw)
        atomic_write_text(target.with_name(target.name + ".reason"),
                          f"{reason} (from {bundle.name})\n")

    def _maybe_finish(self, bundle: Path) -> None:
        if not self._bundles.get(bundle):
            self._bundles.pop(bundle, None)
            _move(bundle, COMMITTED_DIR)

    def ordered(self) -> list[Entry]:
        return list(self.entries.values())

    def resolve(self, rids: list[str] | set[str]) -> None:
        """These records are final: forget them and move their files to committed/."""
        for rid in rids:
            e = self.entries.pop(rid, None)
            if e is None:
                continue
            left = e.pending
            if left is not None:
                left.discard(rid)
                if not left:  # the bundle's last record
                    self._maybe_finish(e.path)
            else:
                _move(e.path, COMMITTED_DIR)

    def reject(self, rid: str, reason: str) -> None:
        """This record can never be valid: forget it, and say why in rejected/."""
        e = self.entries.pop(rid, None)
        if e is None:
            return
        left = e.pending
        if left is not None:
            self._reject_bytes(e.path, e.raw, reason)
            left.discard(rid)
            if not left:  # the bundle's last record
                self._maybe_finish(e.path)
        else:
            reject_file(e.path, reason)
