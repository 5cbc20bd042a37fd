"""Key files: created 0600, refused when others can read them, bound to their name."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gonka_hpc.errors import GonkaError
from gonka_hpc.identity import Identity, is_valid_signature, load_or_create


def test_key_file_is_private_and_reloads(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "uni-b.key"
    ident = load_or_create(path, "uni-b")
    assert path.stat().st_mode & 0o777 == 0o600
    again = load_or_create(path, "uni-b")
    assert again.public_hex == ident.public_hex
    sig = again.sign(b"hello")
    assert is_valid_signature(ident.public_hex, b"hello", sig)
    assert not is_valid_signature(ident.public_hex, b"hellO", sig)


def test_world_readable_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "k.key"
    Identity.generate("uni-b").save(path)
    os.chmod(path, 0o644)
    with pytest.raises(GonkaError, match="chmod 600"):
        Identity.load(path)


def test_key_of_another_account_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "k.key"
    Identity.generate("uni-b").save(path)
    with pytest.raises(GonkaError, match="belongs to 'uni-b'"):
        load_or_create(path, "dc-c")


def test_garbage_key_file(tmp_path: Path) -> None:
    path = tmp_path / "k.key"
    path.write_text("not a key")
    os.chmod(path, 0o600)
    with pytest.raises(GonkaError, match="not a gonka-hpc key file"):
        Identity.load(path)
