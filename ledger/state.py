"""The epoch state machine: what the ledger knows, and which records may change it.

`EpochState` starts from the genesis document and applies signed records one at a time. It is
pure and deterministic (no I/O, no clock, no randomness of its own, integer arithmetic only),
so every validator and every auditor replaying the chain computes the same `state_hash()`.

`apply()` is all-or-nothing: each record kind has a `_check_*` method that validates the record
against the state without touching it and returns a plan (a closure) whose execution cannot
fail. A rejected record raises `InvalidRecord` and leaves the state exactly as it was.

Blocks. Before the records of block `h` are applied, `begin_block(h, prev)` tells the state the
hash of block `h - 1` (`prev`; height 0 is genesis, whose hash the state knows from the start).
So the state knows the hash of every finalized block before the current one (`block_hash`,
`height_of`), and records the height at which each participant joined (`join_height`) and each
batch was committed (`commit_height`). Records applied with no `begin_block` (unit tests) are at
height 0, where the only known hash is genesis's.

The rules that use them (every validator applies the same ones):
- inference_assigned: `block_hash` is a known finalized block hash; every request id starts with
  "<job_id>:" and is new in the job; the job never has more assigned requests than n_requests;
  every request's executor is `choose_executor(block_hash, rid, ta, weights)` with the weights
  of the participants whose join_height <= height_of(block_hash); and Σ over the job's shards of
  max_tokens_total × price_per_token is at most the job's escrow.
- artifact_batch_committed: n_tokens <= the shard's max_tokens_total (so Σ cost <= escrow).
- verdict: the batch's sample block is the hash of the block holding its commit; a verdict
  waits (stays pending) until that hash is known, i.e. until a later block begins. Its
  `sample_block` must equal it and its signer must be `choose_verifier(sample_block, shard_id,
  executor, weights)` with the weights of the participants whose join_height <= commit_height
  (`verification_duty` tells a verifier both). Counts: 0 <= failed <= checked <= the batch's
  n_requests, passed == (failed == 0), and checked == n_requests if the executor's reputation
  is 0. One verdict per batch.
- dispute_vote: a failing verdict opens a dispute on its batch (see "Disputes" below). A vote
  is pending until the dispute is open and the hash of the block holding the failing verdict
  (`dispute_block`) is known. Its signer must be on the panel `choose_panel(dispute_block,
  shard_id, {executor, verifier}, weights, dispute_panel_size)` (same weights as the
  verifier's draw; `dispute_panel` tells a member), once; `sample_block` is the batch's;
  counts follow the verdict rules; `evidence_sha256 == evidence_digest(evidence)`.

Disputes. A failing verdict does not settle its batch by itself. The panel votes; the outcome
is "fail" once the weight of failing votes is more than 2/3 of the panel's weight, "pass" once
the passing votes are, and "open" before. It is monotone: a vote after the outcome is decided
is still recorded (its evidence is on the chain) but cannot change it. A dispute whose panel is
empty (nobody but the executor and the verifier is eligible) is "fail" at once: the failing
verdict stands, there is nobody to appeal to.

Equivocation evidence (`equivocation_evidence`): reported by a genesis validator; the accused
is a genesis validator whose key signed both votes (`ledger.votes.vote_bytes`) for one height,
round and step, with different block hashes; recorded once per offence (`equivocations`). It
moves no money.

Money is conserved: every record keeps Σ balances + Σ escrow constant (`total_supply()`).
The epoch ends with `epoch_close`, which settles each committed batch on its own: a cheater's
batch (its executor has a dispute decided "fail" on any batch) is refunded to the client; a
batch with no verdict from its assigned verifier, or whose dispute is still open, is refunded
too (unverified work is not paid); any other batch (a passing verdict, or a dispute decided
"pass") is paid n_tokens × price_per_token to its executor from the job's escrow. Unused escrow
goes back to the client. The subsidy, min(epoch_subsidy, treasury balance), is split among
honest participants by weight × verified tokens (integer division; the remainder, or all of it
when nobody has verified work, stays in the treasury). A participant's weight therefore only
scales its share of the subsidy, never its share of other participants' payments. Cheaters get
nothing and reputation 0; honest participants with a passing verdict (or a dispute decided
"pass") gain +1 reputation. A verifier whose failing verdict a panel overturns ("pass") drops
to reputation 0, so its own work is checked in full next epoch. Every record after epoch_close
is rejected.

Copies and the state hash. Proposers and voters try blocks on a `copy()`. A copy is
copy-on-write: it shares the jobs (the bulk of the state) with the original, and a plan that
changes a job or a shard first takes a private copy of just that job or shard (`_wjob`,
`_wshard`), so a copy costs O(jobs + accounts + applied records) pointer copies and a block
costs O(its records) in copying. `state_hash()` hashes a digest view of the state (version 4):
the small parts in full, each job as the hash of its fields with each shard as its own digest
(a shard's request ids by their digest; digests are cached and dropped when a job or shard
is written, so a block re-hashes only what it touched), and the applied record ids as a hash
chain in apply order (all validators apply the same records in the same order). Like the full
snapshot, it changes whenever any part of the state does.

Limits: one epoch per state (a closed state accepts nothing; starting the next epoch is a later
issue); a TA may pick any finalized block hash for an assignment (not necessarily the latest
one).
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from gonka_hpc.canonical import canonical_hash, sha256_hex
from gonka_hpc.errors import GonkaError
from gonka_hpc.randomness import choose_executor, choose_panel, choose_verifier
from gonka_hpc.records import (
    ArtifactBatchCommitted,
    DisputeVote,
    EpochClose,
    EquivocationEvidence,
    InferenceAssigned,
    JobAccepted,
    OutputDelivered,
    ParticipantJoined,
    SignedRecord,
    Verdict,
    escrow_authorization_bytes,
    evidence_digest,
)

from .layered_set import LayeredSet
from .sigcache import is_valid_signature, record_signed_by
from .votes import VOTE_STEPS, dumps_float_free, vote_bytes

STATE_VERSION = 4  # 4: digest view (per-job/shard digests, applied-id chain)
DEFAULT_DISPUTE_PANEL_SIZE = 3  # when genesis params do not name one

Plan = Callable[[], None]
_APPLIED_CHAIN_START = hashlib.sha256(b"gonka-hpc applied record ids").digest()


class InvalidRecord(GonkaError):
    """A record the state refuses, with the reason.

    `permanent` is True when the record can never become valid in this epoch (bad encoding or
    signature, a replay, a name or id already taken, a closed epoch): the proposer moves such
    records out of the inbox. Other records (say, a verdict whose batch commit is not final
    yet) stay pending and are retried in later blocks.
    """

    def __init__(self, reason: str, *, permanent: bool = False) -> None:
        self.reason = reason
        self.permanent = permanent
        super().__init__(reason)


# --- read-only views (what the CLI and the verifiers consume) --------------------------------


@dataclass(frozen=True)
class ParticipantInfo:
    """A joined participant as the ledger sees it now."""

    name: str
    pubkey: str
    weight: int
    reputation: int  # +1 per epoch with a passing verdict and no failed one; 0 after cheating
    balance: int
    join_height: int = 0  # height of the block that holds its participant_joined


@dataclass(frozen=True)
class BatchInfo:
    """One shard of a job: its assignment and, once committed, its artifact batch."""

    job_id: str
    shard_id: str
    executor: str
    request_ids: tuple[str, ...]
    committed: bool
    merkle_root: str | None
    n_tokens: int
    verdicts: Mapping[str, bool]  # verifier -> passed (at most one: the assigned verifier)
    max_tokens_total: int = 0  # the most its commit may bill, in tokens
    block_hash: str = ""  # the finalized block the assignment was drawn from
    commit_height: int | None = None  # height of the block that holds the commit
    sample_block: str | None = None  # hash of that block, once a later block has begun
    dispute: str | None = None  # None (no failing verdict), "open", "fail" or "pass"


@dataclass(frozen=True)
class DisputeInfo:
    """A dispute on one batch, opened by its failing verdict."""

    job_id: str
    shard_id: str
    executor: str
    verifier: str  # who signed the failing verdict
    height: int  # the block holding the failing verdict
    dispute_block: str | None  # that block's hash, once a later block has begun
    panel: tuple[str, ...] | None  # drawn from dispute_block (None until it is known)
    votes: Mapping[str, bool]  # panel member -> passed
    outcome: str  # "open", "fail" or "pass"


@dataclass(frozen=True)
class JobInfo:
    """A job accepted by a transfer agent, with its escrow and shards."""

    job_id: str
    client: str
    ta: str
    job_hash: str
    n_requests: int
    escrow: int  # units still held (0 after settlement)
    escrowed: int  # units taken from the client when the job was accepted
    delivered: bool
    shards: tuple[str, ...]


def _same(value: Any) -> Any:
    return value


def _fail(reason: str, *, permanent: bool = False) -> InvalidRecord:
    return InvalidRecord(reason, permanent=permanent)


def _forget(cache: dict[Any, tuple[Any, str]], key: Any, obj: Any) -> None:
    """Drop `cache`'s digest of `obj` (about to change in place); an entry for another
    object under the same key belongs to another copy of the state and stays."""
    hit = cache.get(key)
    if hit is not None and hit[0] is obj:
        del cache[key]


def _is_hex64(value: str) -> bool:
    return len(value) == 64 and all(c in "0123456789abcdef" for c in value)


# --- the state machine ------------------------------------------------------------------------


class EpochState:
    """Participants, accounts, escrow, jobs, batches, verdicts and settlement of one epoch."""

    def __init__(self) -> None:
        # Use from_genesis(); this only declares the fields.
        self.genesis_hash = ""
        self.network = ""
        self.epoch = 0
        self.params: dict[str, int] = {}
        self.validators: list[dict[str, Any]] = []
        self._accounts: dict[str, dict[str, Any]] = {}  # name -> balance, pubkey, role
        # name -> weight, reputation, join_height
        self._participants: dict[str, dict[str, int]] = {}
        self._jobs: dict[str, dict[str, Any]] = {}
        self._escrow: dict[str, int] = {}  # job_id -> units held
        self._applied = LayeredSet()  # record ids (replay protection); copies share most
        # "validator/height/round/step" -> reporter of equivocation evidence (once per offence)
        self._equivocations: dict[str, str] = {}
        self._closed = False
        self._settlement: dict[str, Any] | None = None
        self._height = 0  # the block whose records are being applied (0: none yet)
        self._block_hashes: list[str] = []  # [h] = hash of block h; [0] = genesis
        self._height_of: dict[str, int] = {}  # the inverse of _block_hashes
        # Copy-on-write: jobs and shards this instance may change in place (the others may be
        # shared with copies). Digests of jobs, shards and request-id lists are cached in
        # dicts every copy shares, each entry with the object it digests: an entry counts
        # only for that very object (`is`), and the one state that may change an object in
        # place (its owner) drops the entry first (`_wjob`, `_wshard`). The entries keep
        # their objects alive, so an id is never reused while cached.
        self._own_jobs: set[str] = set()
        self._own_shards: set[tuple[str, str]] = set()
        self._job_digest: dict[str, tuple[dict[str, Any], str]] = {}
        self._shard_digest: dict[tuple[str, str], tuple[dict[str, Any], str]] = {}
        self._ids_digest: dict[tuple[str, str], tuple[list[str], str]] = {}
        self._applied_chain = _APPLIED_CHAIN_START  # sha256 chain over applied record ids

    @classmethod
    def from_genesis(cls, genesis: Mapping[str, Any]) -> EpochState:
        """The state before the epoch's first record. Rejects a malformed genesis."""
        if genesis.get("v") != 1:
            raise GonkaError(f"genesis: unsupported version {genesis.get('v')!r}")
        st = cls()
        st.genesis_hash = canonical_hash(dict(genesis))
        st._block_hashes = [st.genesis_hash]
        st._height_of = {st.genesis_hash: 0}
        st.network = str(genesis["network"])
        st.epoch = int(genesis["epoch"])
        st.params = {k: int(genesis["params"][k])
                     for k in ("price_per_token", "epoch_subsidy", "max_tokens_limit")}
        st.params["dispute_panel_size"] = int(genesis["params"].get(
            "dispute_panel_size", DEFAULT_DISPUTE_PANEL_SIZE))
        if st.params["dispute_panel_size"] < 1:
            raise GonkaError("genesis: params.dispute_panel_size must be >= 1")
        st.validators = [{"name": v["name"], "pubkey": v["pubkey"], "weight": int(v["weight"])}
                         for v in genesis["validators"]]
        names = [v["name"] for v in st.validators]
        if not names or len(set(names)) != len(names):
            raise GonkaError("genesis: validators must be a non-empty list of unique names")
        if any(v["weight"] <= 0 for v in st.validators):
            raise GonkaError("genesis: every validator weight must be > 0")
        for name, acct in genesis["accounts"].items():
            if name in names:
                raise GonkaError(f"genesis: account '{name}' has a validator's name")
            if acct["role"] not in ("treasury", "client"):
                raise GonkaError(f"genesis: account '{name}' has unknown role {acct['role']!r}")
            st._accounts[name] = {"balance": int(acct["balance"]), "pubkey": acct["pubkey"],
                                  "role": acct["role"]}
        if [n for n, a in st._accounts.items() if a["role"] == "treasury"] != ["treasury"]:
            raise GonkaError("genesis: exactly one treasury account, named 'treasury', expected")
        return st

    def copy(self) -> EpochState:
        """An independent copy (proposers and voters try blocks on a copy).

        Copy-on-write: the jobs are shared, and from now on neither this state nor the copy
        owns any of them, so the first change to a job or shard on either side copies just that
        job or shard (`_wjob`, `_wshard`). Request-id lists are never changed once assigned
        and stay shared. Everything else is small and copied here."""
        new = EpochState.__new__(EpochState)
        new.genesis_hash = self.genesis_hash
        new.network = self.network
        new.epoch = self.epoch
        new.params = dict(self.params)
        new.validators = [dict(v) for v in self.validators]
        new._accounts = {n: dict(a) for n, a in self._accounts.items()}
        new._participants = {n: dict(p) for n, p in self._participants.items()}
        new._jobs = dict(self._jobs)
        new._escrow = dict(self._escrow)
        new._applied = self._applied.copy()
        new._equivocations = dict(self._equivocations)
        new._closed = self._closed
        new._settlement = copy.deepcopy(self._settlement)
        new._height = self._height
        new._block_hashes = list(self._block_hashes)
        new._height_of = dict(self._height_of)
        new._own_jobs, new._own_shards = set(), set()
        self._own_jobs, self._own_shards = set(), set()
        new._job_digest = self._job_digest  # shared (see __init__)
        new._shard_digest = self._shard_digest
        new._ids_digest = self._ids_digest
        new._applied_chain = self._applied_chain
        return new

    def _wjob(self, job_id: str) -> dict[str, Any]:
        """The job, owned by this state (copied first if it may be shared), to change."""
        job = self._jobs[job_id]
        if job_id in self._own_jobs:  # changed in place: its cached digest goes
            _forget(self._job_digest, job_id, job)
        else:  # a new object (no cached digest matches it); the shared one keeps its digest
            job = {**job, "shards": dict(job["shards"]),
                   "delivered": copy.deepcopy(job["delivered"])}
            self._jobs[job_id] = job
            self._own_jobs.add(job_id)
        return job

    def _wshard(self, job_id: str, shard_id: str) -> dict[str, Any]:
        """The shard, owned by this state (copied first if it may be shared), to change.
        Its request-id list is never changed and stays shared."""
        job = self._wjob(job_id)
        key = (job_id, shard_id)
        shard = job["shards"][shard_id]
        if key in self._own_shards:  # changed in place: its cached digest goes
            _forget(self._shard_digest, key, shard)
        else:
            batch = shard["batch"]
            shard = {**shard, "batch": None if batch is None else copy.deepcopy(batch)}
            job["shards"][shard_id] = shard
            self._own_shards.add(key)
        return shard  # type: ignore[no-any-return]

    # --- blocks -------------------------------------------------------------------------------

    def begin_block(self, height: int, prev: str) -> None:
        """Start applying the records of block `height`, whose `prev` is the hash of block
        `height` - 1 (genesis for height 1). From now on that hash is a known finalized block.

        `ledger.block.check_block`, the proposer and `replay` call it before a block's records.
        Raises InvalidRecord (permanent) if the height does not follow the current one or
        `prev` does not fit (height 1 must link to genesis; a hash is never reused).
        """
        if not isinstance(height, int) or height != self._height + 1:
            raise _fail(f"block {height!r} does not follow height {self._height}",
                        permanent=True)
        if not isinstance(prev, str) or not prev:
            raise _fail(f"block {height}: prev must be a non-empty string", permanent=True)
        if height == 1:
            if prev != self.genesis_hash:
                raise _fail(f"block 1: prev {prev[:16]} is not the genesis hash "
                            f"{self.genesis_hash[:16]}", permanent=True)
        else:
            if prev in self._height_of:
                raise _fail(f"block {height}: prev {prev[:16]} is already the hash of block "
                            f"{self._height_of[prev]}", permanent=True)
            self._block_hashes.append(prev)
            self._height_of[prev] = height - 1
        self._height = height

    @property
    def height(self) -> int:
        """The height of the block being (or last) applied; 0 before the first block."""
        return self._height

    def block_hash(self, height: int) -> str | None:
        """The hash of finalized block `height` (0: genesis), None if not known yet.

        The hash of block h is known once block h + 1 has begun.
        """
        if isinstance(height, int) and 0 <= height < len(self._block_hashes):
            return self._block_hashes[height]
        return None

    def height_of(self, block_hash: str) -> int | None:
        """The height of a known finalized block hash, None if unknown."""
        return self._height_of.get(block_hash)

    def latest_block_hash(self) -> str:
        """The most recent finalized block hash the state knows (genesis before block 2)."""
        return self._block_hashes[-1]

    def weights_at(self, height: int) -> dict[str, int]:
        """{name: weight} of the participants whose join_height <= `height`."""
        return {n: p["weight"] for n, p in sorted(self._participants.items())
                if p["join_height"] <= height}

    # --- reads --------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def settlement(self) -> dict[str, Any] | None:
        """The epoch_close summary (see `_settle`); None while the epoch is open."""
        return copy.deepcopy(self._settlement)

    def has_applied(self, record_id: str) -> bool:
        return record_id in self._applied

    @property
    def n_applied(self) -> int:
        return len(self._applied)

    def balance(self, name: str) -> int:
        return int(self._accounts[name]["balance"]) if name in self._accounts else 0

    def balances(self) -> dict[str, int]:
        return {n: a["balance"] for n, a in sorted(self._accounts.items())}

    def escrow(self, job_id: str) -> int:
        return self._escrow.get(job_id, 0)

    def total_supply(self) -> int:
        """Σ balances + Σ escrow: every record keeps it constant."""
        return (sum(int(a["balance"]) for a in self._accounts.values())
                + sum(self._escrow.values()))

    def pubkey(self, name: str) -> str | None:
        """The registered public key of an account or validator, None if unknown."""
        if name in self._accounts:
            key = self._accounts[name]["pubkey"]
            return None if key is None else str(key)
        for v in self.validators:
            if v["name"] == name:
                return str(v["pubkey"])
        return None

    def is_participant(self, name: str) -> bool:
        return name in self._participants

    def participant(self, name: str) -> ParticipantInfo:
        p = self._participants[name]
        return ParticipantInfo(name, self._accounts[name]["pubkey"], p["weight"],
                               p["reputation"], self._accounts[name]["balance"],
                               p["join_height"])

    def participants(self) -> dict[str, ParticipantInfo]:
        return {n: self.participant(n) for n in sorted(self._participants)}

    def reputation(self, name: str) -> int:
        """A participant's reputation (0 for new, unknown or caught participants)."""
        p = self._participants.get(name)
        return p["reputation"] if p else 0

    def reputations(self) -> dict[str, int]:
        return {n: p["reputation"] for n, p in sorted(self._participants.items())}

    def job(self, job_id: str) -> JobInfo:
        j = self._jobs[job_id]
        return JobInfo(job_id, j["client"], j["ta"], j["job_hash"], j["n_requests"],
                       self._escrow[job_id], j["escrowed"], j["delivered"] is not None,
                       tuple(sorted(j["shards"])))

    def jobs(self) -> dict[str, JobInfo]:
        return {j: self.job(j) for j in sorted(self._jobs)}

    def batch(self, job_id: str, shard_id: str) -> BatchInfo:
        s = self._jobs[job_id]["shards"][shard_id]
        b = s["batch"]
        return BatchInfo(job_id, shard_id, s["executor"], tuple(s["request_ids"]),
                         b is not None, b["merkle_root"] if b else None,
                         b["n_tokens"] if b else 0,
                         {v: d["passed"] for v, d in sorted(b["verdicts"].items())} if b else {},
                         s["max_tokens_total"], s["block_hash"],
                         b["commit_height"] if b else None,
                         self.block_hash(b["commit_height"]) if b else None,
                         self._outcome(s) if b and b["dispute"] else None)

    def batches(self) -> list[BatchInfo]:
        """Every assigned shard, in (job_id, shard_id) order."""
        return [self.batch(j, s) for j in sorted(self._jobs)
                for s in sorted(self._jobs[j]["shards"])]

    def verification_duty(self, job_id: str, shard_id: str) -> tuple[str, str]:
        """(sample_block, verifier) of a committed batch: the hash its verdict must name as
        `sample_block` (the block holding the commit) and the participant who must sign it.

        Raises InvalidRecord if the shard is unknown or not committed, or if the sample block's
        hash is not known yet (the commit is in the latest block: wait for the next one, or
        ask a copy on which `begin_block(height + 1, head_hash)` was called).
        """
        shard = self._shard_of(job_id, shard_id)
        return self._duty(job_id, shard_id, shard)

    def _duty(self, job_id: str, shard_id: str, shard: dict[str, Any]) -> tuple[str, str]:
        batch = shard["batch"]
        if batch is None:
            raise _fail(f"shard '{shard_id}' of job '{job_id}' is not committed yet")
        height = batch["commit_height"]
        sample = self.block_hash(height)
        if sample is None:
            raise _fail(f"the sample block of shard '{shard_id}' of job '{job_id}' (block "
                        f"{height}, which holds its commit) is not final yet")
        try:
            verifier = choose_verifier(sample, shard_id, shard["executor"],
                                       self.weights_at(height))
        except ValueError:
            raise _fail(f"no participant but the executor at block {height} can verify shard "
                        f"'{shard_id}' of job '{job_id}'", permanent=True) from None
        return sample, verifier

    def dispute_panel(self, job_id: str, shard_id: str) -> tuple[str, list[str]]:
        """(dispute_block, panel) of a disputed batch: the hash its votes must name and the
        participants who may vote, in draw order (maybe none: then the verdict stands).

        Raises InvalidRecord if the batch has no dispute, or if the hash of the block holding
        its failing verdict is not known yet (wait for the next block, as for
        `verification_duty`).
        """
        shard = self._shard_of(job_id, shard_id)
        batch = shard["batch"]
        if batch is None or batch["dispute"] is None:
            raise _fail(f"no dispute is open on shard '{shard_id}' of job '{job_id}'")
        found = self._panel(shard)
        if found is None:
            raise _fail(f"the dispute block of shard '{shard_id}' of job '{job_id}' (block "
                        f"{batch['dispute']['height']}, which holds its failing verdict) is "
                        "not final yet")
        return found[0], list(found[1])

    def disputes(self) -> list[DisputeInfo]:
        """Every dispute of the epoch, in (job_id, shard_id) order."""
        out = []
        for job_id in sorted(self._jobs):
            for shard_id, s in sorted(self._jobs[job_id]["shards"].items()):
                d = s["batch"]["dispute"] if s["batch"] else None
                if d is None:
                    continue
                found = self._panel(s)
                out.append(DisputeInfo(
                    job_id, shard_id, s["executor"], d["verifier"], d["height"],
                    found[0] if found else None, tuple(found[1]) if found else None,
                    {v: x["passed"] for v, x in sorted(d["votes"].items())}, self._outcome(s)))
        return out

    def _eligible(self, shard: dict[str, Any]) -> dict[str, int]:
        """Who may sit on a disputed batch's panel, with their weights: the participants its
        verifier was drawn from (joined by the commit block), but its executor and verifier."""
        batch = shard["batch"]
        return {n: w for n, w in self.weights_at(batch["commit_height"]).items()
                if n not in (shard["executor"], batch["dispute"]["verifier"])}

    def _panel(self, shard: dict[str, Any]) -> tuple[str, list[str], dict[str, int]] | None:
        """(dispute_block, panel, the panel's weights), None while the block is not known."""
        batch = shard["batch"]
        d = batch["dispute"]
        block = self.block_hash(d["height"])
        if block is None:
            return None
        eligible = self._eligible(shard)
        panel = choose_panel(block, self._shard_id_of(shard), (), eligible,
                             self.params["dispute_panel_size"])
        return block, panel, {n: eligible[n] for n in panel}

    def _outcome(self, shard: dict[str, Any]) -> str:
        """"fail", "pass" (more than 2/3 of the panel's weight agrees) or "open"."""
        if not self._eligible(shard):
            return "fail"  # nobody else can re-check: the failing verdict stands
        found = self._panel(shard)
        if found is None:
            return "open"
        weights = found[2]
        total = sum(weights.values())
        votes = shard["batch"]["dispute"]["votes"]
        for outcome, passed in (("fail", False), ("pass", True)):
            if 3 * sum(weights[v] for v, x in votes.items() if x["passed"] is passed) > 2 * total:
                return outcome
        return "open"

    @staticmethod
    def _shard_id_of(shard: dict[str, Any]) -> str:
        return str(shard["batch"]["dispute"]["shard_id"])

    def snapshot(self, *, deep: bool = True) -> dict[str, Any]:
        """The whole state as a canonical-encodable dict (`state_hash` hashes the same with
        jobs and applied ids by digest). With deep=False it shares the state's containers
        (read it, never change it)."""
        return self._view(dup=copy.deepcopy if deep else _same)

    def _view(self, *, dup: Callable[[Any], Any] = _same, digests: bool = False
              ) -> dict[str, Any]:
        """The snapshot, or with digests=True the digest view `state_hash` hashes: jobs as
        {job_id: digest} and applied ids as {"n", "chain"} instead of in full."""
        return {
            "v": STATE_VERSION,
            "genesis": self.genesis_hash,
            "network": self.network,
            "epoch": self.epoch,
            "params": dict(self.params),
            "validators": dup(self.validators),
            "height": self._height,
            "block_hashes": list(self._block_hashes),
            "accounts": dup(self._accounts),
            "participants": dup(self._participants),
            "jobs": ({j: self._digest_of_job(j) for j in sorted(self._jobs)} if digests
                     else dup(self._jobs)),
            "escrow": dict(self._escrow),
            "applied": ({"n": len(self._applied), "chain": self._applied_chain.hex()}
                        if digests else sorted(self._applied)),
            "closed": self._closed,
            "settlement": dup(self._settlement),
            "equivocations": dict(self._equivocations),
        }

    def state_hash(self) -> str:
        """sha256 of the canonical digest view of the state (see the module doc): the small
        parts in full, jobs and shards by their (cached) digests, applied ids as a chain.
        The state holds only ints, bools, strings, lists and string-keyed dicts from
        canonically decoded records (no floats), so `dumps_float_free` gives the canonical
        bytes."""
        return sha256_hex(dumps_float_free(self._view(digests=True)))

    def _digest_of_job(self, job_id: str) -> str:
        job = self._jobs[job_id]
        hit = self._job_digest.get(job_id)
        if hit is not None and hit[0] is job:
            return hit[1]
        shards = {}
        all_shards = job["shards"]
        for sid in sorted(all_shards):
            key = (job_id, sid)
            shard = all_shards[sid]
            sh = self._shard_digest.get(key)
            if sh is not None and sh[0] is shard:
                shards[sid] = sh[1]
                continue
            id_list = shard["request_ids"]
            ih = self._ids_digest.get(key)
            if ih is not None and ih[0] is id_list:
                ids = ih[1]
            else:
                ids = sha256_hex(dumps_float_free(id_list))
                self._ids_digest[key] = (id_list, ids)
            sd = sha256_hex(dumps_float_free({**shard, "request_ids": ids}))
            self._shard_digest[key] = (shard, sd)
            shards[sid] = sd
        d = sha256_hex(dumps_float_free({**job, "shards": shards}))
        self._job_digest[job_id] = (job, d)
        return d

    # --- apply --------------------------------------------------------------------------------

    def check(self, record: SignedRecord) -> Plan:
        """Validate `record` against the state without changing it; return the plan to apply."""
        if self._closed:
            raise _fail(f"epoch {self.epoch} is closed", permanent=True)
        rid = record.record_id
        if rid in self._applied:
            raise _fail(f"record {rid[:16]} already applied (replay)", permanent=True)
        try:
            body = record.typed_body()
        except Exception as exc:  # noqa: BLE001 - any malformed body is a permanent reject
            raise _fail(f"malformed {record.kind} record: {exc}", permanent=True) from None
        if isinstance(body, ParticipantJoined):
            plan = self._check_joined(record, body)
        else:
            self._check_signature(record)
            plan = _CHECKERS[type(body)](self, record, body)

        def run() -> None:
            plan()
            self._applied.add(rid)
            self._applied_chain = hashlib.sha256(self._applied_chain + rid.encode()).digest()
        return run

    def apply(self, record: SignedRecord) -> None:
        """Apply one record, or raise InvalidRecord and leave the state unchanged."""
        self.check(record)()

    def _check_signature(self, record: SignedRecord) -> None:
        pub = self.pubkey(record.signer)
        if pub is None:
            raise _fail(f"unknown signer '{record.signer}'")
        if not record_signed_by(pub, record):
            raise _fail(f"bad signature by '{record.signer}' on {record.kind}",
                        permanent=True)

    def _job_of(self, job_id: str) -> dict[str, Any]:
        if job_id not in self._jobs:
            raise _fail(f"unknown job '{job_id}'")
        return self._jobs[job_id]

    def _shard_of(self, job_id: str, shard_id: str) -> dict[str, Any]:
        shards = self._job_of(job_id)["shards"]
        if shard_id not in shards:
            raise _fail(f"unknown shard '{shard_id}' of job '{job_id}'")
        return shards[shard_id]  # type: ignore[no-any-return]

    # --- one checker per record kind -----------------------------------------------------------

    def _check_joined(self, rec: SignedRecord, b: ParticipantJoined) -> Plan:
        if rec.signer != b.participant:
            raise _fail(f"participant_joined for '{b.participant}' signed by '{rec.signer}'; "
                        "it must be self-signed", permanent=True)
        if not record_signed_by(b.pubkey, rec):
            raise _fail(f"bad signature on participant_joined of '{b.participant}' "
                        "(must verify with body.pubkey)", permanent=True)
        if not b.participant:
            raise _fail("participant name is empty", permanent=True)
        if self.pubkey(b.participant) is not None or b.participant in self._accounts:
            raise _fail(f"name '{b.participant}' is already taken", permanent=True)
        if b.weight <= 0:
            raise _fail(f"participant weight must be > 0, got {b.weight}", permanent=True)
        height = self._height

        def plan() -> None:
            self._accounts[b.participant] = {"balance": 0, "pubkey": b.pubkey,
                                             "role": "participant"}
            self._participants[b.participant] = {"weight": b.weight, "reputation": 0,
                                                 "join_height": height}
        return plan

    def _check_job(self, rec: SignedRecord, b: JobAccepted) -> Plan:
        if rec.signer != b.ta:
            raise _fail(f"job_accepted names ta '{b.ta}' but is signed by '{rec.signer}'",
                        permanent=True)
        if b.ta not in self._participants:
            raise _fail(f"ta '{b.ta}' is not a participant")
        client = self._accounts.get(b.client)
        if client is None or client["role"] != "client":
            raise _fail(f"'{b.client}' is not a client account", permanent=True)
        auth = escrow_authorization_bytes(b.job_id, b.ta, b.job_hash, b.escrow)
        if not is_valid_signature(client["pubkey"], auth, b.client_signature):
            raise _fail(f"client_signature of '{b.client}' does not authorize this escrow",
                        permanent=True)
        if b.job_id in self._jobs:
            raise _fail(f"job '{b.job_id}' already exists", permanent=True)
        if b.n_requests < 0:
            raise _fail(f"n_requests must be >= 0, got {b.n_requests}", permanent=True)
        if b.escrow < 0:
            raise _fail(f"escrow must be >= 0, got {b.escrow}", permanent=True)
        if b.escrow > client["balance"]:
            raise _fail(f"escrow {b.escrow} exceeds the balance {client['balance']} of "
                        f"'{b.client}'")

        def plan() -> None:
            client["balance"] -= b.escrow
            self._escrow[b.job_id] = b.escrow
            self._jobs[b.job_id] = {"client": b.client, "ta": b.ta, "job_hash": b.job_hash,
                                    "n_requests": b.n_requests, "escrowed": b.escrow,
                                    "delivered": None, "shards": {}}
            self._own_jobs.add(b.job_id)
        return plan

    def _check_assigned(self, rec: SignedRecord, b: InferenceAssigned) -> Plan:
        job = self._job_of(b.job_id)
        ta = job["ta"]
        if rec.signer != ta:
            raise _fail(f"inference_assigned for job '{b.job_id}' must be signed by its ta "
                        f"'{ta}', not '{rec.signer}'", permanent=True)
        if b.executor == ta:
            raise _fail(f"executor '{b.executor}' is the job's ta; a ta never executes its "
                        "own jobs", permanent=True)
        if b.shard_id in job["shards"]:
            raise _fail(f"shard '{b.shard_id}' of job '{b.job_id}' already assigned",
                        permanent=True)
        ids = list(b.request_ids)
        if len(set(ids)) != len(ids):
            raise _fail("duplicate request ids within the shard", permanent=True)
        taken = {r for s in job["shards"].values() for r in s["request_ids"]}
        dup = sorted(taken.intersection(ids))
        if dup:
            raise _fail(f"request ids already assigned in job '{b.job_id}': {dup[:3]}",
                        permanent=True)
        prefix = f"{b.job_id}:"
        foreign = [r for r in ids if not r.startswith(prefix)]
        if foreign:
            raise _fail(f"request ids must start with '{prefix}': {foreign[:3]}",
                        permanent=True)
        if len(taken) + len(ids) > job["n_requests"]:
            raise _fail(f"job '{b.job_id}' would have {len(taken) + len(ids)} assigned "
                        f"requests, more than its n_requests {job['n_requests']}",
                        permanent=True)
        if b.max_tokens_total < 0:
            raise _fail(f"max_tokens_total must be >= 0, got {b.max_tokens_total}",
                        permanent=True)
        at = self.height_of(b.block_hash)
        if at is None:
            raise _fail(f"block_hash {b.block_hash[:16]} is not the hash of a finalized block",
                        permanent=True)
        if b.executor not in self._participants:
            raise _fail(f"executor '{b.executor}' is not a participant", permanent=True)
        weights = self.weights_at(at)
        for rid in ids:
            try:
                chosen = choose_executor(b.block_hash, rid, ta, weights)
            except ValueError:
                raise _fail(f"no participant but the ta joined by block {at}: nobody can "
                            "execute", permanent=True) from None
            if chosen != b.executor:
                raise _fail(f"request '{rid}' belongs to executor '{chosen}' (drawn from block "
                            f"{at}), not '{b.executor}'", permanent=True)
        price = self.params["price_per_token"]
        worst = price * (b.max_tokens_total
                         + sum(s["max_tokens_total"] for s in job["shards"].values()))
        if worst > job["escrowed"]:
            raise _fail(f"the job's shards may bill {worst} units (Σ max_tokens_total × "
                        f"price), more than the escrow {job['escrowed']} of job '{b.job_id}'",
                        permanent=True)

        def plan() -> None:
            self._wjob(b.job_id)["shards"][b.shard_id] = {
                                         "executor": b.executor, "request_ids": ids,
                                         "max_tokens_total": b.max_tokens_total,
                                         "shard_hash": b.shard_hash,
                                         "block_hash": b.block_hash, "batch": None}
            self._own_shards.add((b.job_id, b.shard_id))
        return plan

    def _check_committed(self, rec: SignedRecord, b: ArtifactBatchCommitted) -> Plan:
        shard = self._shard_of(b.job_id, b.shard_id)
        if not (rec.signer == b.executor == shard["executor"]):
            raise _fail(f"artifact_batch_committed for shard '{b.shard_id}' must be signed by "
                        f"its executor '{shard['executor']}' (signer '{rec.signer}', body "
                        f"executor '{b.executor}')", permanent=True)
        if shard["batch"] is not None:
            raise _fail(f"shard '{b.shard_id}' of job '{b.job_id}' already committed",
                        permanent=True)
        if b.n_requests != len(shard["request_ids"]):
            raise _fail(f"batch has n_requests {b.n_requests}, shard was assigned "
                        f"{len(shard['request_ids'])}", permanent=True)
        if b.n_tokens < 0:
            raise _fail(f"n_tokens must be >= 0, got {b.n_tokens}", permanent=True)
        if b.n_tokens > shard["max_tokens_total"]:
            raise _fail(f"batch has n_tokens {b.n_tokens}, more than the shard's "
                        f"max_tokens_total {shard['max_tokens_total']}", permanent=True)
        height = self._height

        def plan() -> None:
            self._wshard(b.job_id, b.shard_id)["batch"] = {
                              "merkle_root": b.merkle_root, "n_requests": b.n_requests,
                              "n_tokens": b.n_tokens, "model_hash": b.model_hash,
                              "file_sha256": b.file_sha256, "commit_height": height,
                              "verdicts": {}, "dispute": None}
        return plan

    def _check_delivered(self, rec: SignedRecord, b: OutputDelivered) -> Plan:
        job = self._job_of(b.job_id)
        if rec.signer != job["ta"]:
            raise _fail(f"output_delivered for job '{b.job_id}' must be signed by its ta "
                        f"'{job['ta']}', not '{rec.signer}'", permanent=True)
        if job["delivered"] is not None:
            raise _fail(f"output of job '{b.job_id}' already delivered", permanent=True)

        def plan() -> None:
            self._wjob(b.job_id)["delivered"] = {
                                "output_sha256": b.output_sha256, "n_lines": b.n_lines,
                                "n_errors": b.n_errors}
        return plan

    def _check_verdict(self, rec: SignedRecord, b: Verdict) -> Plan:
        shard = self._shard_of(b.job_id, b.shard_id)
        if rec.signer not in self._participants:
            raise _fail(f"verifier '{rec.signer}' is not a participant")
        if rec.signer == shard["executor"]:
            raise _fail(f"'{rec.signer}' cannot judge its own batch", permanent=True)
        if b.executor != shard["executor"]:
            raise _fail(f"verdict names executor '{b.executor}', the shard's executor is "
                        f"'{shard['executor']}'", permanent=True)
        batch = shard["batch"]
        if batch is None:
            raise _fail(f"shard '{b.shard_id}' of job '{b.job_id}' is not committed yet")
        if b.merkle_root != batch["merkle_root"]:
            raise _fail("verdict merkle_root does not match the committed batch",
                        permanent=True)
        sample, verifier = self._duty(b.job_id, b.shard_id, shard)  # pending until known
        if b.sample_block != sample:
            raise _fail(f"verdict sample_block {b.sample_block[:16]} is not {sample[:16]}, the "
                        f"hash of block {batch['commit_height']} that holds the commit",
                        permanent=True)
        if rec.signer != verifier:
            raise _fail(f"'{rec.signer}' is not the assigned verifier of shard '{b.shard_id}' "
                        f"of job '{b.job_id}': block {batch['commit_height']} assigns "
                        f"'{verifier}'", permanent=True)
        if rec.signer in batch["verdicts"]:
            raise _fail(f"'{rec.signer}' already judged shard '{b.shard_id}' of job "
                        f"'{b.job_id}'", permanent=True)
        n = batch["n_requests"]
        if not 0 <= b.failed <= b.checked <= n:
            raise _fail(f"verdict counts out of range: need 0 <= failed ({b.failed}) <= "
                        f"checked ({b.checked}) <= the batch's n_requests ({n})",
                        permanent=True)
        if b.passed != (b.failed == 0):
            raise _fail(f"verdict says passed={b.passed} with failed={b.failed}: passed must "
                        "be (failed == 0)", permanent=True)
        if self.reputation(b.executor) == 0 and b.checked != n:
            raise _fail(f"executor '{b.executor}' has reputation 0: all {n} requests must be "
                        f"checked, the verdict checked {b.checked}", permanent=True)

        height = self._height

        def plan() -> None:
            batch = self._wshard(b.job_id, b.shard_id)["batch"]
            batch["verdicts"][rec.signer] = {"passed": b.passed, "checked": b.checked,
                                             "failed": b.failed}
            if not b.passed:  # a failing verdict opens a dispute, drawn from this block
                batch["dispute"] = {"shard_id": b.shard_id, "verifier": rec.signer,
                                    "height": height, "votes": {}}
        return plan

    def _check_vote(self, rec: SignedRecord, b: DisputeVote) -> Plan:
        shard = self._shard_of(b.job_id, b.shard_id)
        where = f"shard '{b.shard_id}' of job '{b.job_id}'"
        if rec.signer not in self._participants:
            raise _fail(f"dispute voter '{rec.signer}' is not a participant")
        if b.executor != shard["executor"]:
            raise _fail(f"dispute_vote names executor '{b.executor}', the shard's executor is "
                        f"'{shard['executor']}'", permanent=True)
        batch = shard["batch"]
        if batch is None:
            raise _fail(f"{where} is not committed yet")
        if b.merkle_root != batch["merkle_root"]:
            raise _fail("dispute_vote merkle_root does not match the committed batch",
                        permanent=True)
        dispute = batch["dispute"]
        if dispute is None:
            if batch["verdicts"]:
                raise _fail(f"no dispute on {where}: its verdict passed", permanent=True)
            raise _fail(f"no dispute is open on {where} (no failing verdict yet)")
        sample = self.block_hash(batch["commit_height"])
        if b.sample_block != sample:
            raise _fail(f"dispute_vote sample_block {b.sample_block[:16]} is not the batch's "
                        f"sample block {str(sample)[:16]}", permanent=True)
        found = self._panel(shard)
        if found is None:  # pending until the block holding the failing verdict is final
            raise _fail(f"the dispute block of {where} (block {dispute['height']}) is not "
                        "final yet")
        block, panel, _ = found
        if b.dispute_block != block:
            raise _fail(f"dispute_vote dispute_block {b.dispute_block[:16]} is not {block[:16]},"
                        f" the hash of block {dispute['height']} that holds the failing verdict",
                        permanent=True)
        if rec.signer not in panel:
            raise _fail(f"'{rec.signer}' is not on the dispute panel of {where}: block "
                        f"{dispute['height']} draws {panel}", permanent=True)
        if rec.signer in dispute["votes"]:
            raise _fail(f"'{rec.signer}' already voted on the dispute of {where}",
                        permanent=True)
        n = batch["n_requests"]
        if not 0 <= b.failed <= b.checked <= n:
            raise _fail(f"dispute_vote counts out of range: need 0 <= failed ({b.failed}) <= "
                        f"checked ({b.checked}) <= the batch's n_requests ({n})",
                        permanent=True)
        if b.passed != (b.failed == 0):
            raise _fail(f"dispute_vote says passed={b.passed} with failed={b.failed}: passed "
                        "must be (failed == 0)", permanent=True)
        if self.reputation(b.executor) == 0 and b.checked != n:
            raise _fail(f"executor '{b.executor}' has reputation 0: all {n} requests must be "
                        f"checked, the vote checked {b.checked}", permanent=True)
        if not _is_hex64(b.evidence_sha256):
            raise _fail("dispute_vote evidence_sha256 is not 64 lower-case hex digits",
                        permanent=True)
        try:
            digest = evidence_digest(b.evidence)
        except (TypeError, ValueError) as exc:  # pragma: no cover - from_dict checks it
            raise _fail(f"dispute_vote evidence is not canonical: {exc}",
                        permanent=True) from None
        if b.evidence_sha256 != digest:
            raise _fail(f"dispute_vote evidence_sha256 {b.evidence_sha256[:16]} is not the "
                        f"digest {digest[:16]} of its evidence", permanent=True)

        def plan() -> None:
            dispute = self._wshard(b.job_id, b.shard_id)["batch"]["dispute"]
            dispute["votes"][rec.signer] = {"passed": b.passed, "checked": b.checked,
                                            "failed": b.failed,
                                            "evidence_sha256": b.evidence_sha256}
        return plan

    def equivocations(self) -> dict[str, str]:
        """{"validator/height/round/step": reporter} of every equivocation on record."""
        return dict(sorted(self._equivocations.items()))

    def _check_equivocation(self, rec: SignedRecord, b: EquivocationEvidence) -> Plan:
        """Two different votes, both signed by the accused, for one (height, round, step);
        reported by a genesis validator; one record per offence."""
        names = {v["name"]: v["pubkey"] for v in self.validators}
        if rec.signer not in names:
            raise _fail(f"equivocation_evidence reported by '{rec.signer}', who is not a "
                        "genesis validator", permanent=True)
        if b.validator not in names:
            raise _fail(f"equivocation_evidence accuses '{b.validator}', who is not a genesis "
                        "validator", permanent=True)
        if b.step not in VOTE_STEPS or b.height < 1 or b.round < 0:
            raise _fail(f"equivocation_evidence names no vote: step {b.step!r}, height "
                        f"{b.height}, round {b.round}", permanent=True)
        if b.block_hash_a == b.block_hash_b:
            raise _fail("equivocation_evidence holds two votes for the same block hash",
                        permanent=True)
        for h, sig in ((b.block_hash_a, b.signature_a), (b.block_hash_b, b.signature_b)):
            if not is_valid_signature(names[b.validator],
                                      vote_bytes(b.step, b.height, b.round, h), sig):
                raise _fail(f"equivocation_evidence: the {b.step} for '{h[:16] or 'nil'}' is "
                            f"not signed by '{b.validator}'", permanent=True)
        key = f"{b.validator}/{b.height}/{b.round}/{b.step}"
        if key in self._equivocations:
            raise _fail(f"equivocation {key} is already on record", permanent=True)

        def plan() -> None:
            self._equivocations[key] = rec.signer
        return plan

    def _check_close(self, rec: SignedRecord, b: EpochClose) -> Plan:
        if rec.signer not in {v["name"] for v in self.validators}:
            raise _fail(f"epoch_close signed by '{rec.signer}', who is not a genesis validator",
                        permanent=True)
        if b.epoch != self.epoch:
            raise _fail(f"epoch_close for epoch {b.epoch}, the current epoch is {self.epoch}",
                        permanent=True)
        summary, credits, reputation, escrow_left = self._settle()

        def plan() -> None:
            for name, amount in credits.items():
                self._accounts[name]["balance"] += amount
            for name, rep in reputation.items():
                self._participants[name]["reputation"] = rep
            self._escrow = escrow_left
            self._settlement = summary
            self._closed = True
        return plan

    # --- settlement ----------------------------------------------------------------------------

    def _settle(self) -> tuple[dict[str, Any], dict[str, int], dict[str, int], dict[str, int]]:
        """Compute the settlement without changing the state.

        Returns (summary, balance credits by account (the treasury's may be negative),
        new reputations, escrow after settlement). Credits sum to Σ escrow, so money is
        conserved. The summary's keys:
          rewards: name -> payments + subsidy share (participants with > 0 only)
          payments: name -> n_tokens × price of its verified, honest batches
          subsidy_shares: name -> its share of the subsidy (> 0 only)
          refunds: client -> units returned (cheated, unverified and unused escrow)
          forfeited: sorted cheaters (a dispute decided "fail" on any of their batches)
          unverified: shard ids of honest committed batches refunded for lack of a verdict,
            or because their dispute is still open
          disputes: one entry per dispute: job_id, shard_id, executor, verifier, outcome
            ("fail", "pass" or "undecided") and votes (member -> passed)
          overturned: sorted verifiers whose failing verdict a panel overturned
          pool: Σ rewards (all paid to participants); subsidy: what the treasury put in;
          returned_to_treasury: the subsidy not shared; reputation: name -> new reputation.
        """
        price = self.params["price_per_token"]
        shards = {(j, sid): s for j, job in sorted(self._jobs.items())
                  for sid, s in sorted(job["shards"].items()) if s["batch"] is not None}
        outcomes = {key: self._outcome(s) for key, s in shards.items() if s["batch"]["dispute"]}
        cheaters = sorted({s["executor"] for key, s in shards.items()
                           if outcomes.get(key) == "fail"})
        passing = {s["executor"] for key, s in shards.items() if outcomes.get(key) == "pass"
                   or (key not in outcomes and s["batch"]["verdicts"])}
        overturned = sorted({shards[key]["batch"]["dispute"]["verifier"]
                             for key, o in outcomes.items() if o == "pass"})
        disputes = [{"job_id": j, "shard_id": sid, "executor": shards[j, sid]["executor"],
                     "verifier": shards[j, sid]["batch"]["dispute"]["verifier"],
                     "outcome": "undecided" if o == "open" else o,
                     "votes": {v: x["passed"] for v, x in
                               sorted(shards[j, sid]["batch"]["dispute"]["votes"].items())}}
                    for (j, sid), o in outcomes.items()]
        refunds: dict[str, int] = {}
        payments: dict[str, int] = {}
        verified_tokens: dict[str, int] = {}
        unverified: list[str] = []
        for job_id in sorted(self._jobs):
            job = self._jobs[job_id]
            held = self._escrow[job_id]
            paid = 0
            for shard_id in sorted(job["shards"]):
                s = job["shards"][shard_id]
                batch = s["batch"]
                if batch is None or s["executor"] in cheaters:
                    continue  # uncommitted or cheated work is refunded below
                if not batch["verdicts"] or outcomes.get((job_id, shard_id)) == "open":
                    unverified.append(shard_id)  # unverified work is not paid
                    continue
                cost = batch["n_tokens"] * price
                paid += cost
                ex = s["executor"]
                payments[ex] = payments.get(ex, 0) + cost
                verified_tokens[ex] = verified_tokens.get(ex, 0) + batch["n_tokens"]
            refunds[job["client"]] = refunds.get(job["client"], 0) + held - paid
        subsidy = min(self.params["epoch_subsidy"], self._accounts["treasury"]["balance"])
        scores = {p: self._participants[p]["weight"] * t
                  for p, t in sorted(verified_tokens.items()) if t > 0}
        total = sum(scores.values())
        shares = {p: subsidy * sc // total for p, sc in scores.items()} if total else {}
        shares = {p: a for p, a in shares.items() if a > 0}
        back_to_treasury = subsidy - sum(shares.values())
        rewards = {p: payments.get(p, 0) + shares.get(p, 0)
                   for p in sorted(set(payments) | set(shares))}
        rewards = {p: a for p, a in rewards.items() if a > 0}

        credits: dict[str, int] = {}
        for name, amount in refunds.items():
            credits[name] = credits.get(name, 0) + amount
        for name, amount in rewards.items():
            credits[name] = credits.get(name, 0) + amount
        credits["treasury"] = credits.get("treasury", 0) - subsidy + back_to_treasury
        reputation = {p: 0 for p in cheaters}
        for p in sorted(passing - set(cheaters) - set(overturned)):
            reputation[p] = self._participants[p]["reputation"] + 1
        for p in overturned:
            reputation[p] = 0  # a false accusation: its own work is checked in full next
        summary = {
            "epoch": self.epoch,
            "pool": sum(rewards.values()),
            "subsidy": subsidy,
            "rewards": rewards,
            "payments": {p: a for p, a in sorted(payments.items()) if a > 0},
            "subsidy_shares": shares,
            "refunds": {c: a for c, a in sorted(refunds.items())},
            "forfeited": cheaters,
            "unverified": unverified,
            "disputes": disputes,
            "overturned": overturned,
            "returned_to_treasury": back_to_treasury,
            "reputation": {p: reputation.get(p, self._participants[p]["reputation"])
                           for p in sorted(self._participants)},
        }
        return summary, credits, reputation, {j: 0 for j in self._escrow}


_CHECKERS: dict[type, Callable[..., Plan]] = {
    JobAccepted: EpochState._check_job,
    InferenceAssigned: EpochState._check_assigned,
    ArtifactBatchCommitted: EpochState._check_committed,
    OutputDelivered: EpochState._check_delivered,
    Verdict: EpochState._check_verdict,
    DisputeVote: EpochState._check_vote,
    EpochClose: EpochState._check_close,
    EquivocationEvidence: EpochState._check_equivocation,
}  # the checker of each record kind but participant_joined (checked by its own key)


# --- replay -----------------------------------------------------------------------------------


def records_of(block: Any) -> list[SignedRecord]:
    """The decoded records of a block (a `Block`, or a dict with a "records" list).

    Raises InvalidRecord (permanent) for anything that does not decode, whatever the error.
    """
    try:
        raw = block["records"] if isinstance(block, Mapping) else block.records
        return [SignedRecord.from_dict(r) for r in raw]
    except Exception as exc:  # noqa: BLE001 - any undecodable record makes the block invalid
        raise InvalidRecord(f"undecodable record: {_describe(exc)}", permanent=True) from None


def _describe(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, GonkaError) else f"{type(exc).__name__}: {exc}"


def _hash_of(block: Any) -> str:
    """The hash of a block as `replay` receives it: a `Block`, a block dict, or (in tests)
    any dict with a "records" list, hashed canonically."""
    h = getattr(block, "hash", None)
    return h if isinstance(h, str) else canonical_hash(dict(block))


def replay(genesis: Mapping[str, Any], blocks: Iterable[Any]) -> EpochState:
    """The state after applying every record of `blocks`, in order, to genesis.

    Block i (1-based) begins with `begin_block(i, hash of block i - 1)`, exactly as consensus
    does, so the result equals the validators' state after the last block. (The state does not
    know the last block's hash until the next block begins; to ask it, e.g. for
    `verification_duty` on a commit in the last block, call `begin_block(height + 1,
    head_hash)` on the result or a copy.)

    Raises InvalidRecord naming the block index (1-based) and record at the first failure.
    State hashes and prev links in the blocks are not checked here; `check_block` does that.
    """
    state = EpochState.from_genesis(genesis)
    prev = state.genesis_hash
    for i, block in enumerate(blocks, start=1):
        state.begin_block(i, prev)
        try:
            records = records_of(block)
        except InvalidRecord as exc:
            raise InvalidRecord(f"block {i}: {exc.reason}", permanent=True) from None
        for j, rec in enumerate(records):
            try:
                state.apply(rec)
            except InvalidRecord as exc:
                raise InvalidRecord(f"block {i}, record {j}: {exc.reason}",
                                    permanent=exc.permanent) from None
            except Exception as exc:  # noqa: BLE001 - same verdict as check_block
                raise InvalidRecord(f"block {i}, record {j}: {_describe(exc)}",
                                    permanent=True) from None
        prev = _hash_of(block)
    return state
