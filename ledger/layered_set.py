"""A set that copies in time proportional to its newest members, not to its size.

Every block is tried on a copy of the epoch state (the proposer's trial, each validator's
check), and the state holds every record id applied this epoch for replay protection. A
plain `set` copy costs about 20 ns per member: 1 ms per block at 50,000 records, growing
with the epoch, paid by every validator, then once more to free the copy. Here older
members sit in frozen levels that every copy shares; a copy owns only the members added
since the last seal. Levels are merged like a binary counter (each at least four times the
size of the next), so there are few of them and each member is merged O(log n) times (about
ten times at 500,000 members); the rare big merge costs what one plain copy did.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

SEAL_AT = 2048  # own members past which a copy freezes them into a shared level
_MERGE_RATIO = 4  # a level is merged into the one below until that one is 4x its size


class LayeredSet:
    """Strings (record ids) with add, membership, len, iteration and a cheap `copy`."""

    __slots__ = ("_levels", "_frozen_len", "_top")

    def __init__(self, members: Iterable[str] = ()) -> None:
        self._levels: tuple[frozenset[str], ...] = ()  # shared by copies; largest first
        self._frozen_len = 0
        self._top: set[str] = set(members)  # owned by this instance

    def __contains__(self, item: object) -> bool:
        if item in self._top:
            return True
        for level in self._levels:
            if item in level:
                return True
        return False

    def add(self, item: str) -> None:
        for level in self._levels:  # levels and top stay disjoint, so len() is a sum
            if item in level:
                return
        self._top.add(item)

    def __len__(self) -> int:
        return self._frozen_len + len(self._top)

    def __iter__(self) -> Iterator[str]:
        top, levels = self._top, self._levels  # (a seal during iteration swaps both)
        yield from top
        for level in levels:
            yield from level

    def copy(self) -> LayeredSet:
        """An independent copy; costs O(members added since the last seal)."""
        if len(self._top) >= SEAL_AT:
            self._seal()
        new = LayeredSet.__new__(LayeredSet)
        new._levels, new._frozen_len, new._top = self._levels, self._frozen_len, set(self._top)
        return new

    def _seal(self) -> None:
        """Move the own members into a shared level (same members: safe for copies)."""
        levels = list(self._levels)
        new = frozenset(self._top)
        while levels and len(levels[-1]) <= _MERGE_RATIO * len(new):
            new = levels.pop() | new
        levels.append(new)
        self._levels = tuple(levels)
        self._frozen_len = sum(len(level) for level in levels)
        self._top = set()
