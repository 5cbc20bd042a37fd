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

Money is conserved: every record keeps Σ balances + Σ escrow constant (`total_supply()`).
The epoch ends with `epoch_close`, which settles each committed batch on its own: a cheater's
batch (its executor has a failed verdict on any batch) is refunded to the client; a batch with
no verdict from its assigned verifier is refunded too (unverified work is not paid); any other
batch is paid n_tokens × price_per_token to its executor from the job's escrow. Unused escrow
goes back to the client. The subsidy, min(epoch_subsidy, treasury balance), is split among
honest participants by weight × verified tokens (integer division; the remainder, or all of it
when nobody has verified work, stays in the treasury). A participant's weight therefore only
scales its share of the subsidy, never its share of other participants' payments. Cheaters get
nothing and reputation 0; honest participants with a passing verdict gain +1 reputation. Every
record after epoch_close is rejected.

Limits: one epoch per state (a closed state accepts nothing; starting the next epoch is a later
issue); `copy()` is a deep copy, fine for thousands of jobs, not for millions; a TA may pick any
finalized block hash for an assignment (not necessarily the latest one).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from gonka_hpc.canonical import canonical_hash
from gonka_hpc.errors import GonkaError, SignatureError
from gonka_hpc.identity import is_valid_signature
from gonka_hpc.randomness import choose_executor, choose_verifier
from gonka_hpc.records import (
    ArtifactBatchCommitted,
    EpochClose,
    InferenceAssigned,
    JobAccepted,
    OutputDelivered,
    ParticipantJoined,
    SignedRecord,
    Verdict,
    escrow_authorization_bytes,
)

STATE_VERSION = 2

Plan = Callable[[], None]


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


def _fail(reason: str, *, permanent: bool = False) -> InvalidRecord:
    return InvalidRecord(reason, permanent=permanent)


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
        self._applied: set[str] = set()  # record ids (replay protection)
        self._closed = False
        self._settlement: dict[str, Any] | None = None
        self._height = 0  # the block whose records are being applied (0: none yet)
        self._block_hashes: list[str] = []  # [h] = hash of block h; [0] = genesis
        self._height_of: dict[str, int] = {}  # the inverse of _block_hashes

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
        """An independent copy (proposers and voters try blocks on a copy)."""
        return copy.deepcopy(self)

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
                         self.block_hash(b["commit_height"]) if b else None)

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

    def snapshot(self) -> dict[str, Any]:
        """The whole state as a canonical-encodable dict (what `state_hash` hashes)."""
        return {
            "v": STATE_VERSION,
            "genesis": self.genesis_hash,
            "network": self.network,
            "epoch": self.epoch,
            "params": dict(self.params),
            "validators": copy.deepcopy(self.validators),
            "height": self._height,
            "block_hashes": list(self._block_hashes),
            "accounts": copy.deepcopy(self._accounts),
            "participants": copy.deepcopy(self._participants),
            "jobs": copy.deepcopy(self._jobs),
            "escrow": dict(self._escrow),
            "applied": sorted(self._applied),
            "closed": self._closed,
            "settlement": copy.deepcopy(self._settlement),
        }

    def state_hash(self) -> str:
        return canonical_hash(self.snapshot())

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
            checker = {
                JobAccepted: self._check_job,
                InferenceAssigned: self._check_assigned,
                ArtifactBatchCommitted: self._check_committed,
                OutputDelivered: self._check_delivered,
                Verdict: self._check_verdict,
                EpochClose: self._check_close,
            }[type(body)]
            plan = checker(record, body)  # type: ignore[operator]

        def run() -> None:
            plan()
            self._applied.add(rid)
        return run

    def apply(self, record: SignedRecord) -> None:
        """Apply one record, or raise InvalidRecord and leave the state unchanged."""
        self.check(record)()

    def _check_signature(self, record: SignedRecord) -> None:
        pub = self.pubkey(record.signer)
        if pub is None:
            raise _fail(f"unknown signer '{record.signer}'")
        try:
            record.verify(pub)
        except SignatureError:
            raise _fail(f"bad signature by '{record.signer}' on {record.kind}",
                        permanent=True) from None

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
        if not is_valid_signature(b.pubkey, rec.signing_bytes(), rec.signature):
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
            job["shards"][b.shard_id] = {"executor": b.executor, "request_ids": ids,
                                         "max_tokens_total": b.max_tokens_total,
                                         "shard_hash": b.shard_hash,
                                         "block_hash": b.block_hash, "batch": None}
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
            shard["batch"] = {"merkle_root": b.merkle_root, "n_requests": b.n_requests,
                              "n_tokens": b.n_tokens, "model_hash": b.model_hash,
                              "file_sha256": b.file_sha256, "commit_height": height,
                              "verdicts": {}}
        return plan

    def _check_delivered(self, rec: SignedRecord, b: OutputDelivered) -> Plan:
        job = self._job_of(b.job_id)
        if rec.signer != job["ta"]:
            raise _fail(f"output_delivered for job '{b.job_id}' must be signed by its ta "
                        f"'{job['ta']}', not '{rec.signer}'", permanent=True)
        if job["delivered"] is not None:
            raise _fail(f"output of job '{b.job_id}' already delivered", permanent=True)

        def plan() -> None:
            job["delivered"] = {"output_sha256": b.output_sha256, "n_lines": b.n_lines,
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

        def plan() -> None:
            batch["verdicts"][rec.signer] = {"passed": b.passed, "checked": b.checked,
                                             "failed": b.failed}
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
          forfeited: sorted cheaters (a failed verdict on any of their batches)
          unverified: shard ids of honest committed batches refunded for lack of a verdict
          pool: Σ rewards (all paid to participants); subsidy: what the treasury put in;
          returned_to_treasury: the subsidy not shared; reputation: name -> new reputation.
        """
        price = self.params["price_per_token"]
        shards = [s for j in self._jobs.values() for s in j["shards"].values()
                  if s["batch"] is not None]
        cheaters = sorted({s["executor"] for s in shards
                           if any(not v["passed"] for v in s["batch"]["verdicts"].values())})
        passing = {s["executor"] for s in shards
                   if any(v["passed"] for v in s["batch"]["verdicts"].values())}
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
                if not batch["verdicts"]:
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
        for p in sorted(passing - set(cheaters)):
            reputation[p] = self._participants[p]["reputation"] + 1
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
            "returned_to_treasury": back_to_treasury,
            "reputation": {p: reputation.get(p, self._participants[p]["reputation"])
                           for p in sorted(self._participants)},
        }
        return summary, credits, reputation, {j: 0 for j in self._escrow}


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
