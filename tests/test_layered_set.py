"""LayeredSet: the record-id set that epoch-state copies share (ledger/layered_set.py)."""

from __future__ import annotations

import random

import pytest

from ledger import layered_set
from ledger.layered_set import LayeredSet


@pytest.fixture(autouse=True)
def _small_seals(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(layered_set, "SEAL_AT", 8)  # many seals and merges in a short test


def test_behaves_like_a_set_through_copies_seals_and_merges() -> None:
    """Random adds on a tree of copies: every copy answers membership, len and iteration
    exactly as a plain set given the same adds, and no copy sees another's additions."""
    rng = random.Random(7)
    copies: list[tuple[LayeredSet, set[str]]] = [(LayeredSet(), set())]
    for step in range(3000):
        i = rng.randrange(len(copies))
        ls, ref = copies[i]
        if rng.random() < 0.05 and len(copies) < 40:
            copies.append((ls.copy(), set(ref)))
            continue
        item = f"r{rng.randrange(1500)}"  # re-adds of present members happen too
        ls.add(item)
        ref.add(item)
        if step % 97 == 0:
            for ls_j, ref_j in copies:
                assert len(ls_j) == len(ref_j)
                assert sorted(ls_j) == sorted(ref_j)
    for ls, ref in copies:
        assert len(ls) == len(ref) and set(ls) == ref
        for k in range(1500):
            assert (f"r{k}" in ls) == (f"r{k}" in ref)
    assert any(len(ls._levels) > 0 for ls, _ in copies)  # the shared levels were exercised


def test_a_copy_shares_frozen_levels_and_owns_only_recent_members() -> None:
    ls = LayeredSet(f"a{i}" for i in range(100))
    c = ls.copy()  # 100 >= SEAL_AT: sealed into a shared level first
    assert c._levels is ls._levels and not c._top and not ls._top
    c.add("new")
    assert "new" in c and "new" not in ls and len(c) == 101 and len(ls) == 100
    ls.add("a5")  # already in a frozen level: no duplicate, len unchanged
    assert len(ls) == 100 and "a5" not in ls._top


def test_levels_stay_few_as_the_set_grows() -> None:
    ls = LayeredSet()
    for i in range(20_000):
        ls.add(f"x{i}")
        if i % 10 == 0:
            ls = ls.copy()
    assert len(ls) == 20_000
    # each level is more than 4x the next: at most log4(20000 / 8) + 1 levels
    assert len(ls._levels) <= 7
    sizes = [len(level) for level in ls._levels]
    assert sizes == sorted(sizes, reverse=True)


def test_iteration_is_not_disturbed_by_a_seal_in_the_middle() -> None:
    """`copy()` may seal the source (its members move into a level): an iteration already
    under way still yields each member once."""
    ls = LayeredSet(f"m{i}" for i in range(20))
    it = iter(ls)
    first = next(it)
    ls.copy()  # 20 >= SEAL_AT: seals `ls`
    rest = list(it)
    assert sorted([first, *rest]) == sorted(f"m{i}" for i in range(20))
