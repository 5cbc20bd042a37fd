"""The epoch state machine: what the ledger knows, and which records may change it.

`EpochState` starts from the genesis document and applies signed records one at a time. It is
pure and deterministic (no I/O, no clock, no randomness, integer arithmetic only), so every
validator and every auditor replaying the chain computes the same `state_hash()`.

`apply()` is all-or-nothing: each record kind has a `_check_*` method that validates the record
against the state without touching it and returns a plan (a closure) whose execution cannot
fail. A rejected record raises `InvalidRecord` and leaves the state exactly as it was.

Money is conserved: every record keeps Σ balances + Σ escrow constant (`total_supply()`).
The epoch ends with `epoch_close`, which settles: cheaters' work is refunded to clients and
forfeits its reward, honest work is paid from the pool (work costs + treasury subsidy) in
proportion to weight × tokens, and every record after it is rejected.

Limits: one epoch per state (a closed state accepts nothing; starting the next epoch is a later
issue); `copy()` is a deep copy, fine for thousands of jobs, not for millions.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from gonka_hpc.canonical import canonical_hash
from gonka_hpc.errors import GonkaError, SignatureError
from gonka_hpc.identity import is_valid_signature
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

STATE_VERSION = 1

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
    verdicts: Mapping[str, bool]  # verifier -> passed


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
        self._participants: dict[str, dict[str, int]] = {}  # name -> weight, reputation
        self._jobs: dict[str, dict[str, Any]] = {}
        self._escrow: dict[str, int] = {}  # job_id -> units held
        self._applied: set[str] = set()  # record ids (replay protection)
        self._closed = False
        self._settlement: dict[str, Any] | None = None

    @classmethod
    def from_genesis(cls, genesis: Mapping[str, Any]) -> EpochState:
        """The state before the epoch's first record. Rejects a malformed genesis."""
        if genesis.get("v") != 1:
            raise GonkaError(f"genesis: unsupported version {genesis.get('v')!r}")
        st = cls()
        st.genesis_hash = canonical_hash(dict(genesis))
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

    # --- reads --------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def settlement(self) -> dict[str, Any] | None:
        """The epoch_close summary: pool, subsidy, rewards, refunds, forfeited; None if open."""
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
                               p["reputation"], self._accounts[name]["balance"])

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
                         {v: d["passed"] for v, d in sorted(b["verdicts"].items())} if b else {})

    def batches(self) -> list[BatchInfo]:
        """Every assigned shard, in (job_id, shard_id) order."""
        return [self.batch(j, s) for j in sorted(self._jobs)
                for s in sorted(self._jobs[j]["shards"])]

    def snapshot(self) -> dict[str, Any]:
        """The whole state as a canonical-encodable dict (what `state_hash` hashes)."""
        return {
            "v": STATE_VERSION,
            "genesis": self.genesis_hash,
            "network": self.network,
            "epoch": self.epoch,
            "params": dict(self.params),
            "validators": copy.deepcopy(self.validators),
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
        except GonkaError as exc:
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

        def plan() -> None:
            self._accounts[b.participant] = {"balance": 0, "pubkey": b.pubkey,
                                             "role": "participant"}
            self._participants[b.participant] = {"weight": b.weight, "reputation": 0}
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
                                    "spent": 0, "delivered": None, "shards": {}}
        return plan

    def _check_assigned(self, rec: SignedRecord, b: InferenceAssigned) -> Plan:
        job = self._job_of(b.job_id)
        if rec.signer != job["ta"]:
            raise _fail(f"inference_assigned for job '{b.job_id}' must be signed by its ta "
                        f"'{job['ta']}', not '{rec.signer}'", permanent=True)
        if b.executor not in self._participants:
            raise _fail(f"executor '{b.executor}' is not a participant")
        if b.executor == job["ta"]:
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

        def plan() -> None:
            job["shards"][b.shard_id] = {"executor": b.executor, "request_ids": ids,
                                         "shard_hash": b.shard_hash,
                                         "block_hash": b.block_hash, "batch": None}
        return plan

    def _check_committed(self, rec: SignedRecord, b: ArtifactBatchCommitted) -> Plan:
        shard = self._shard_of(b.job_id, b.shard_id)
        job = self._jobs[b.job_id]
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
        cost = b.n_tokens * self.params["price_per_token"]
        if job["spent"] + cost > job["escrowed"]:
            raise _fail(f"batch cost {cost} plus {job['spent']} already committed exceeds the "
                        f"escrow {job['escrowed']} of job '{b.job_id}'", permanent=True)

        def plan() -> None:
            job["spent"] += cost
            shard["batch"] = {"merkle_root": b.merkle_root, "n_requests": b.n_requests,
                              "n_tokens": b.n_tokens, "model_hash": b.model_hash,
                              "file_sha256": b.file_sha256, "verdicts": {}}
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
        if rec.signer in batch["verdicts"]:
            raise _fail(f"'{rec.signer}' already judged shard '{b.shard_id}' of job "
                        f"'{b.job_id}'", permanent=True)
        if b.checked < 0 or b.failed < 0 or b.failed > b.checked:
            raise _fail(f"verdict counts out of range: checked {b.checked}, failed {b.failed}",
                        permanent=True)

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
        conserved.
        """
        price = self.params["price_per_token"]
        shards = [s for j in self._jobs.values() for s in j["shards"].values()
                  if s["batch"] is not None]
        cheaters = sorted({s["executor"] for s in shards
                           if any(not v["passed"] for v in s["batch"]["verdicts"].values())})
        passing = {s["executor"] for s in shards
                   if any(v["passed"] for v in s["batch"]["verdicts"].values())}
        refunds: dict[str, int] = {}
        honest_tokens: dict[str, int] = {}
        pool_from_work = 0
        for job_id in sorted(self._jobs):
            job = self._jobs[job_id]
            held = self._escrow[job_id]
            paid = 0
            for shard_id in sorted(job["shards"]):
                s = job["shards"][shard_id]
                if s["batch"] is None or s["executor"] in cheaters:
                    continue  # uncommitted or cheated work is refunded below
                cost = s["batch"]["n_tokens"] * price
                paid += cost
                honest_tokens[s["executor"]] = (honest_tokens.get(s["executor"], 0)
                                                + s["batch"]["n_tokens"])
            pool_from_work += paid
            refunds[job["client"]] = refunds.get(job["client"], 0) + held - paid
        subsidy = min(self.params["epoch_subsidy"], self._accounts["treasury"]["balance"])
        pool = pool_from_work + subsidy
        scores = {p: self._participants[p]["weight"] * t for p, t in honest_tokens.items()
                  if t > 0}
        total = sum(scores.values())
        rewards = {p: pool * sc // total for p, sc in sorted(scores.items())} if total else {}
        back_to_treasury = pool - sum(rewards.values())

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
            "pool": pool,
            "pool_from_work": pool_from_work,
            "subsidy": subsidy,
            "rewards": rewards,
            "refunds": {c: a for c, a in sorted(refunds.items())},
            "forfeited": cheaters,
            "returned_to_treasury": back_to_treasury,
            "reputation": {p: reputation.get(p, self._participants[p]["reputation"])
                           for p in sorted(self._participants)},
        }
        return summary, credits, reputation, {j: 0 for j in self._escrow}


# --- replay -----------------------------------------------------------------------------------


def records_of(block: Any) -> list[SignedRecord]:
    """The decoded records of a block (a `Block`, or a dict with a "records" list)."""
    raw = block["records"] if isinstance(block, Mapping) else block.records
    try:
        return [SignedRecord.from_dict(r) for r in raw]
    except GonkaError as exc:
        raise InvalidRecord(f"undecodable record: {exc}", permanent=True) from None


def replay(genesis: Mapping[str, Any], blocks: Iterable[Any]) -> EpochState:
    """The state after applying every record of `blocks`, in order, to genesis.

    Raises InvalidRecord naming the block index (0-based) and record at the first failure.
    State hashes in the blocks are not checked here; `ledger.block.check_block` does that.
    """
    state = EpochState.from_genesis(genesis)
    for i, block in enumerate(blocks):
        for j, rec in enumerate(records_of(block)):
            try:
                state.apply(rec)
            except InvalidRecord as exc:
                raise InvalidRecord(f"block {i + 1}, record {j}: {exc.reason}",
                                    permanent=exc.permanent) from None
    return state
