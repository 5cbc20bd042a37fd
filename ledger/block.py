"""Blocks, precommit votes and commit certificates, and the check of a block against a state.

A block is `{"v":1,"height","round","prev","proposer","records":[record dicts],"state_hash"}`.
Its hash is sha256 of its canonical bytes. Height 1's `prev` is `canonical_hash(genesis)`;
`state_hash` is the state after `begin_block(height, prev)` and the block's records, so a block
commits to the state (which includes the hashes of the blocks before it) as well as to its
history.

A validator votes yes by signing the canonical precommit
`{"v":1,"kind":"precommit","height","round","block_hash"}` (`ledger.votes`). A commit
certificate is the list of yes votes `{"index","validator","signature"}` sorted by validator
index, all from one round: the block's own round, or the round named by an extra `"round"`
key on every vote when the block was committed in a later round than it was proposed (a
locked block re-proposed). It is valid iff the indices are distinct genesis validators, every
signature verifies, and their weight is more than 2/3 of all the genesis validators' weight.

The proposer of (height, round) is chosen by weight (`ledger.proposer`): a deterministic
weighted rotation, so a silent or faulty proposer only costs one round.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from gonka_hpc.canonical import canonical_bytes, canonical_hash, sha256_hex
from gonka_hpc.errors import GonkaError
from gonka_hpc.identity import Identity, is_valid_signature
from gonka_hpc.records import SignedRecord

from .proposer import proposer_index as _weighted_proposer
from .state import STATE_VERSION, EpochState, InvalidRecord, records_of
from .votes import PRECOMMIT, decode_canonical, dumps_canonical, vote_bytes

BLOCK_VERSION = 1


class InvalidBlock(GonkaError):
    """A block, vote or certificate that does not check out; `height` locates it."""

    def __init__(self, reason: str, *, height: int | None = None) -> None:
        self.reason = reason
        self.height = height
        super().__init__(f"height {height}: {reason}" if height is not None else reason)


@dataclass(frozen=True)
class Block:
    """One block of the chain (records are the signed records' dicts, as `to_dict` gives)."""

    height: int  # 1 for the first block after genesis
    round: int  # consensus round in which it was proposed (0 unless a proposer failed)
    prev: str  # hash of the previous block, or of genesis for height 1
    proposer: str  # validator name; must be validators[(height + round) % n]
    records: tuple[dict[str, Any], ...]
    state_hash: str  # EpochState.state_hash() after applying the records

    def to_dict(self) -> dict[str, Any]:
        return {"v": BLOCK_VERSION, "height": self.height, "round": self.round,
                "prev": self.prev, "proposer": self.proposer, "records": list(self.records),
                "state_hash": self.state_hash}

    def encode(self) -> bytes:
        return self._encoded

    @cached_property
    def _encoded(self) -> bytes:  # a block is immutable: encode (and hash) it once
        return canonical_bytes(self.to_dict())

    @cached_property
    def hash(self) -> str:
        return sha256_hex(self.encode())

    @classmethod
    def from_canonical(cls, raw: bytes) -> Block:
        """The block whose canonical bytes are `raw` (as a peer sends them); raises
        InvalidBlock unless `raw` is canonical and a well-formed block."""
        try:
            data, digest = decode_canonical(raw)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise InvalidBlock(f"block bytes: {exc}") from None
        block = cls.from_dict(data)
        block.__dict__["_encoded"] = bytes(raw)
        block.__dict__["hash"] = digest
        return block

    @cached_property
    def record_lengths(self) -> tuple[int, ...] | None:
        """The byte length of each record inside `encode()`, when known (a block built by
        `of_records` or parsed by `from_parts`): a hint peers use to cut the records out of
        the block's bytes (`from_parts`) instead of parsing the whole block."""
        return None

    @classmethod
    def of_records(cls, height: int, round_: int, prev: str, proposer: str,
                   records: Sequence[SignedRecord], state_hash: str) -> Block:
        """The block of these records, its canonical bytes put together from the records'
        own canonical bytes (each encoded once, when it was decoded or signed)."""
        parts = [r.encode() for r in records]
        block = cls(height, round_, prev, proposer, tuple(r.to_dict() for r in records),
                    state_hash)
        block.__dict__["_encoded"] = _block_bytes(height, round_, prev, proposer, parts,
                                                  state_hash)
        block.__dict__["record_lengths"] = tuple(len(p) for p in parts)
        return block

    @classmethod
    def from_parts(cls, raw: bytes, lengths: Any,
                   known: Callable[[str], SignedRecord | None]
                   ) -> tuple[Block, list[SignedRecord], list[str]] | None:
        """Parse a block's canonical bytes by cutting its records out at `lengths` (a
        peer's hint, `record_lengths`): returns (block, its records, their ids), or None
        whenever the hint does not fit exactly, and the caller falls back to
        `from_canonical`. The result is then exactly what `from_canonical` gives: the bytes
        around the records must re-encode to themselves, and each record's bytes are either
        those of a record we hold (`known(sha256 of the bytes)`: the same bytes) or decode to
        a record whose canonical bytes they are. Nothing is encoded again."""
        if not isinstance(lengths, (tuple, list)) or not lengths:
            return None
        start = raw.find(_RECORDS_KEY)
        if start < 0:
            return None
        pos = start + len(_RECORDS_KEY)
        parts = []
        for k, n in enumerate(lengths):
            if type(n) is not int or n <= 0:
                return None
            if k:
                if raw[pos:pos + 1] != b",":
                    return None
                pos += 1
            parts.append(raw[pos:pos + n])
            pos += n
        try:
            head = json.loads(raw[:start] + b"}")
            tail = json.loads(b"{" + raw[pos + 2:]) if raw[pos:pos + 2] == b"]," else None
        except (ValueError, UnicodeDecodeError, RecursionError):
            return None
        if not (isinstance(head, dict) and isinstance(tail, dict)
                and set(head) == {"height", "prev", "proposer"}
                and set(tail) == {"round", "state_hash", "v"} and tail["v"] == BLOCK_VERSION
                and type(head["height"]) is int and type(tail["round"]) is int
                and all(type(x) is str for x in (head["prev"], head["proposer"],
                                                  tail["state_hash"]))):
            return None
        try:
            if _block_bytes(head["height"], tail["round"], head["prev"], head["proposer"],
                            parts, tail["state_hash"]) != raw:
                return None
        except ValueError:  # a string that is not UTF-8 encodable (a lone surrogate)
            return None
        records, rids = [], []
        for part in parts:
            rid = hashlib.sha256(part).hexdigest()
            rec = known(rid)
            if rec is None:
                try:
                    rec = SignedRecord.decode(part)
                except Exception:  # noqa: BLE001 - not a record: the slow path judges it
                    return None
                if rec.encode() != part:
                    return None
            records.append(rec)
            rids.append(rid)
        block = cls(head["height"], tail["round"], head["prev"], head["proposer"],
                    tuple(r.to_dict() for r in records), tail["state_hash"])
        block.__dict__["_encoded"] = bytes(raw)
        block.__dict__["hash"] = hashlib.sha256(raw).hexdigest()
        block.__dict__["record_lengths"] = tuple(lengths)
        return block, records, rids

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Block:
        if not isinstance(data, Mapping) or data.get("v") != BLOCK_VERSION:
            raise InvalidBlock("not a version-1 block")
        try:
            block = cls(int(data["height"]), int(data["round"]), str(data["prev"]),
                        str(data["proposer"]), tuple(data["records"]), str(data["state_hash"]))
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise InvalidBlock(f"malformed block: {exc!r}") from None
        if block.to_dict() != dict(data):
            raise InvalidBlock("block has unexpected fields or types", height=block.height)
        return block


_RECORDS_KEY = b',"records":['


def _block_bytes(height: int, round_: int, prev: str, proposer: str, records: Sequence[bytes],
                 state_hash: str) -> bytes:
    """The canonical bytes of a block whose records' canonical bytes are `records` (keys in
    sorted order: height, prev, proposer, records, round, state_hash, v)."""
    return b"".join((b'{"height":', str(height).encode(), b',"prev":', dumps_canonical(prev),
                     b',"proposer":', dumps_canonical(proposer), _RECORDS_KEY,
                     b",".join(records), b'],"round":', str(round_).encode(),
                     b',"state_hash":', dumps_canonical(state_hash),
                     b',"v":', str(BLOCK_VERSION).encode(), b"}"))


def genesis_hash(genesis: Mapping[str, Any]) -> str:
    """The `prev` of block 1."""
    return canonical_hash(dict(genesis))


def proposer_index(validators: Sequence[Mapping[str, Any]], height: int, round_: int) -> int:
    """The genesis index of the proposer of (height, round), chosen by weight."""
    return _weighted_proposer(validators, height, round_)


# --- votes and certificates --------------------------------------------------------------------


def precommit_bytes(height: int, round_: int, block_hash: str) -> bytes:
    """What a validator signs to vote yes on a block."""
    return vote_bytes(PRECOMMIT, height, round_, block_hash)


def sign_precommit(identity: Identity, index: int, block: Block,
                   round_: int | None = None) -> dict[str, Any]:
    """A yes vote by validator `index` (its position in genesis) on `block`, cast in
    `round_` (default: the block's round; another round is named in the vote)."""
    r = block.round if round_ is None else round_
    vote = {"index": index, "validator": identity.name,
            "signature": identity.sign(precommit_bytes(block.height, r, block.hash))}
    if r != block.round:
        vote["round"] = r
    return vote


def vote_round(block: Block, vote: Mapping[str, Any]) -> int | None:
    """The round a certificate vote was cast in (None if its "round" is malformed)."""
    r = vote.get("round", block.round)
    return r if isinstance(r, int) and not isinstance(r, bool) and r >= 0 else None


def vote_is_valid(validators: Sequence[Mapping[str, Any]], block: Block,
                  vote: Mapping[str, Any]) -> bool:
    """True iff `vote` is a well-formed, correctly signed yes vote on `block`."""
    idx = vote.get("index")
    if not isinstance(idx, int) or isinstance(idx, bool) or not 0 <= idx < len(validators):
        return False
    r = vote_round(block, vote)
    if r is None or ("round" in vote and r == block.round):
        return False  # the round is named only when it differs: one form per vote
    v = validators[idx]
    return (vote.get("validator") == v["name"] and isinstance(vote.get("signature"), str)
            and is_valid_signature(v["pubkey"], precommit_bytes(block.height, r, block.hash),
                                   vote["signature"]))


def make_certificate(validators: Sequence[Mapping[str, Any]], block: Block,
                     votes: Sequence[Mapping[str, Any] | None]) -> list[dict[str, Any]]:
    """The valid yes votes among `votes` (None is a nil vote), one per validator, by index."""
    best: dict[int, dict[str, Any]] = {}
    for vote in votes:
        if vote is not None and vote_is_valid(validators, block, vote):
            best.setdefault(vote["index"], dict(vote))
    return [best[i] for i in sorted(best)]


def has_quorum(validators: Sequence[Mapping[str, Any]], indices: Sequence[int]) -> bool:
    """More than 2/3 of the total validator weight (integer arithmetic, no rounding)."""
    total = sum(int(v["weight"]) for v in validators)
    got = sum(int(validators[i]["weight"]) for i in set(indices))
    return 3 * got > 2 * total


def check_certificate(validators: Sequence[Mapping[str, Any]], block: Block,
                      certificate: Sequence[Mapping[str, Any]]) -> None:
    """Raise InvalidBlock unless `certificate` commits `block`."""
    raw = [c.get("index") for c in certificate]
    indices = [i for i in raw if isinstance(i, int) and not isinstance(i, bool)]
    if len(indices) != len(raw) or indices != sorted(set(indices)):
        raise InvalidBlock("certificate votes are not sorted by distinct validator index",
                           height=block.height)
    if len({vote_round(block, c) for c in certificate}) > 1:
        raise InvalidBlock("certificate votes come from different rounds", height=block.height)
    for vote in certificate:
        if set(vote) - {"round"} != {"index", "validator", "signature"}:
            raise InvalidBlock(f"certificate vote has fields {sorted(vote)}", height=block.height)
        if not vote_is_valid(validators, block, vote):
            raise InvalidBlock(f"certificate vote of validator {vote.get('index')} "
                               f"('{vote.get('validator')}') does not verify",
                               height=block.height)
    if not has_quorum(validators, indices):
        raise InvalidBlock(f"certificate weight is not more than 2/3 ({len(indices)} of "
                           f"{len(validators)} validators)", height=block.height)


# --- a block against the state before it --------------------------------------------------------


def check_block(state: EpochState, block: Block, *, height: int, prev: str,
                round_: int | None = None,
                decoded: Sequence[SignedRecord] | None = None) -> EpochState:
    """Check `block` as the next block after a chain whose head is (`height` - 1, `prev`).

    Checks height, prev link, round (if given), proposer rotation, every record (signature and
    state transition) and the resulting state hash. The records are applied after
    `state.begin_block(height, prev)`, so the new state knows the hash of block `height` - 1.
    Returns the new state; `state` itself is not changed. Raises InvalidBlock naming what
    failed, whatever the error (an exception while decoding or checking a record included), so
    a validator votes nil on a bad block instead of crashing. `decoded` are the block's
    records already decoded by the caller (each must encode to the block's record dict).
    """
    if block.height != height:
        raise InvalidBlock(f"expected height {height}, block says {block.height}",
                           height=block.height)
    if block.prev != prev:
        raise InvalidBlock(f"prev {block.prev[:16]} does not link to {prev[:16]}",
                           height=height)
    if round_ is not None and block.round != round_:
        raise InvalidBlock(f"expected round {round_}, block says {block.round}", height=height)
    if block.round < 0:
        raise InvalidBlock("negative round", height=height)
    vals = state.validators
    expected = vals[proposer_index(vals, height, block.round)]["name"]
    if block.proposer != expected:
        raise InvalidBlock(f"proposer '{block.proposer}' is not round {block.round}'s "
                           f"proposer '{expected}'", height=height)
    if not block.records:
        raise InvalidBlock("empty block", height=height)
    new = state.copy()
    try:
        new.begin_block(height, prev)
        records = list(decoded) if decoded is not None else records_of(block)
        if len(records) != len(block.records):
            raise InvalidBlock("decoded records do not match the block", height=height)
    except InvalidRecord as exc:
        raise InvalidBlock(exc.reason, height=height) from None
    except Exception as exc:  # noqa: BLE001 - a bad block is a nil vote, never a crash
        raise InvalidBlock(f"{type(exc).__name__}: {exc}", height=height) from None
    for j, rec in enumerate(records):
        try:
            new.apply(rec)
        except InvalidRecord as exc:
            raise InvalidBlock(f"record {j} ({rec.kind} by '{rec.signer}'): {exc.reason}",
                               height=height) from None
        except Exception as exc:  # noqa: BLE001 - whatever the error, the block is invalid
            raise InvalidBlock(f"record {j} ({rec.kind} by '{rec.signer}'): "
                               f"{type(exc).__name__}: {exc}", height=height) from None
    got = new.state_hash()
    if got != block.state_hash:
        raise InvalidBlock(f"state_hash {block.state_hash[:16]} does not match the replayed "
                           f"state {got[:16]} (replayed as state version {STATE_VERSION}; "
                           "a chain from a gonka-hpc with another does not replay)",
                           height=height)
    return new
