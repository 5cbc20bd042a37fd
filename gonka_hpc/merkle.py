"""A binary Merkle tree over per-request leaves (sha256, domain-separated).

Leaves hash as sha256(0x00 || data) and nodes as sha256(0x01 || left || right), so a leaf can
never pass for a node. An odd node is promoted, not duplicated, which avoids Bitcoin's
duplicate-leaf ambiguity (CVE-2012-2459). Proofs let a verifier check one inference against a
committed root without the whole batch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

EMPTY_ROOT = hashlib.sha256(b"").hexdigest()


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def _node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _levels(leaves: Sequence[bytes]) -> list[list[bytes]]:
    levels = [list(leaves)]
    while len(levels[-1]) > 1:
        cur = levels[-1]
        nxt = [_node(cur[i], cur[i + 1]) for i in range(0, len(cur) - 1, 2)]
        if len(cur) % 2:
            nxt.append(cur[-1])
        levels.append(nxt)
    return levels


def merkle_root(leaf_hashes: Sequence[bytes]) -> str:
    """Hex root over already-hashed leaves (use `leaf_hash`)."""
    if not leaf_hashes:
        return EMPTY_ROOT
    return _levels(leaf_hashes)[-1][0].hex()


def merkle_proof(leaf_hashes: Sequence[bytes], index: int) -> list[tuple[str, str]]:
    """Sibling path for leaf `index`: [(side, hex), ...] with side 'L' or 'R' of the sibling."""
    proof = []
    for level in _levels(leaf_hashes)[:-1]:
        sib = index ^ 1
        if sib < len(level):
            proof.append(("L" if sib < index else "R", level[sib].hex()))
        index //= 2
    return proof


def verify_proof(leaf: bytes, proof: Sequence[tuple[str, str]], root: str) -> bool:
    h = leaf
    for side, sib_hex in proof:
        sib = bytes.fromhex(sib_hex)
        h = _node(sib, h) if side == "L" else _node(h, sib)
    return h.hex() == root
