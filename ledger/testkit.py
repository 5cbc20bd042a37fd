"""A deterministic toy network for tests and demos: keys, genesis and signed records.

`World` derives every key from a seed string, builds a genesis document in the format of
`gonka_hpc.config.genesis`, and signs well-formed records with one short call each, so tests
read as the story of an epoch. Not used by the validators themselves.

Records that the ledger ties to the chain are made from a state: `assign_to` picks request ids
that `choose_executor` gives to the wanted executor at a finalized block, and `judge` signs a
verdict as the batch's assigned verifier with its sample block (`state.verification_duty`);
`vote` and `panel_votes` sign dispute votes by the panel `state.dispute_panel` draws.
`next_block` starts a block on a bare state (a made-up prev hash), so a commit's sample block
becomes known. `build_chain` accepts such record makers (callables of the state) in its batches.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gonka_hpc.canonical import canonical_hash, sha256_hex
from gonka_hpc.identity import Identity
from gonka_hpc.randomness import choose_executor
from gonka_hpc.records import (
    ArtifactBatchCommitted,
    DisputeVote,
    EpochClose,
    InferenceAssigned,
    JobAccepted,
    OutputDelivered,
    ParticipantJoined,
    SignedRecord,
    Verdict,
    escrow_authorization_bytes,
    evidence_digest,
    sign_record,
)

from .audit import audit_chain
from .block import Block, make_certificate, proposer_index, sign_precommit
from .chain import Chain, head
from .state import EpochState

MAX_TOKENS_TOTAL = 250  # the default shard budget: 4 shards × 250 × price 10 = the default escrow

RecordMaker = SignedRecord | Callable[[EpochState], SignedRecord]


def _h(text: str) -> str:
    return sha256_hex(text.encode())


class World:
    """Validators, clients and participants with deterministic keys, and their genesis."""

    def __init__(self, n_validators: int = 4, clients: dict[str, int] | None = None,
                 treasury: int = 1_000_000, price_per_token: int = 10,
                 epoch_subsidy: int = 100_000, seed: str = "world", epoch: int = 1) -> None:
        self.seed = seed
        self._ids: dict[str, Identity] = {}
        self.validator_names = [f"validator-{i}" for i in range(n_validators)]
        clients = {"alice": 1_000_000} if clients is None else clients
        accounts: dict[str, dict[str, Any]] = {
            "treasury": {"balance": treasury, "pubkey": None, "role": "treasury"}}
        for name, bal in clients.items():
            accounts[name] = {"balance": bal, "pubkey": self.identity(name).public_hex,
                              "role": "client"}
        self.genesis: dict[str, Any] = {
            "v": 1, "network": "testnet", "epoch": epoch,
            "params": {"price_per_token": price_per_token, "epoch_subsidy": epoch_subsidy,
                       "max_tokens_limit": 256},
            "validators": [{"name": n, "pubkey": self.identity(n).public_hex, "weight": 1}
                           for n in self.validator_names],
            "accounts": accounts,
        }

    def identity(self, name: str) -> Identity:
        if name not in self._ids:
            seed = hashlib.sha256(f"{self.seed}:{name}".encode()).digest()
            self._ids[name] = Identity.from_seed(name, seed)
        return self._ids[name]

    def save_validator_keys(self, keydir: Path) -> None:
        """KEYDIR/validator-<r>.key for every validator (what `ledger run --keys` reads)."""
        Path(keydir).mkdir(parents=True, exist_ok=True)
        for i, name in enumerate(self.validator_names):
            self.identity(name).save(Path(keydir) / f"validator-{i}.key")

    # --- records ------------------------------------------------------------------------------

    def join(self, name: str, weight: int = 10) -> SignedRecord:
        ident = self.identity(name)
        return sign_record(ident, ParticipantJoined(name, ident.public_hex, weight))

    def job(self, job_id: str, client: str = "alice", ta: str = "ta", escrow: int = 10_000,
            n_requests: int = 4, job_hash: str | None = None) -> SignedRecord:
        job_hash = job_hash or _h(f"job:{job_id}")
        auth = self.identity(client).sign(escrow_authorization_bytes(job_id, ta, job_hash,
                                                                     escrow))
        return sign_record(self.identity(ta), JobAccepted(job_id, client, ta, job_hash,
                                                          n_requests, escrow, auth))

    @property
    def genesis_hash(self) -> str:
        return canonical_hash(self.genesis)

    def assign(self, job_id: str, shard_id: str, executor: str,
               request_ids: Sequence[str] | None = None, ta: str = "ta", *,
               max_tokens_total: int = MAX_TOKENS_TOTAL,
               block_hash: str | None = None) -> SignedRecord:
        """An assignment exactly as given (request ids "<job_id>:0", "<job_id>:1" and the
        genesis hash by default); see `assign_to` for one the ledger accepts."""
        rids = (f"{job_id}:0", f"{job_id}:1") if request_ids is None else tuple(request_ids)
        return sign_record(self.identity(ta), InferenceAssigned(
            job_id, shard_id, executor, rids, max_tokens_total,
            _h(f"shard:{job_id}:{shard_id}"), block_hash or self.genesis_hash))

    def request_ids_for(self, state: EpochState, job_id: str, executor: str, n: int = 2, *,
                        ta: str | None = None, block_hash: str | None = None,
                        skip: Sequence[str] = ()) -> tuple[str, ...]:
        """`n` unassigned request ids "<job_id>:<i>" that `choose_executor` gives to
        `executor` at `block_hash` (default: the latest block hash the state knows)."""
        block_hash = block_hash or state.latest_block_hash()
        at = state.height_of(block_hash)
        weights = state.weights_at(at if at is not None else state.height)
        jobs = state.jobs()
        if ta is None:
            ta = jobs[job_id].ta if job_id in jobs else "ta"
        taken = set(skip)
        if job_id in jobs:
            taken.update(r for s in jobs[job_id].shards
                         for r in state.batch(job_id, s).request_ids)
        if weights.get(executor, 0) <= 0 or executor == ta:
            raise ValueError(f"'{executor}' cannot be drawn at block {block_hash[:16]}")
        out: list[str] = []
        for i in range(20_000):
            if len(out) == n:
                return tuple(out)
            rid = f"{job_id}:{i}"
            if rid not in taken and choose_executor(block_hash, rid, ta, weights) == executor:
                out.append(rid)
        raise ValueError(f"no {n} request ids of job '{job_id}' go to '{executor}'")

    def assign_to(self, state: EpochState, job_id: str, shard_id: str, executor: str,
                  n: int = 2, *, ta: str | None = None,
                  max_tokens_total: int = MAX_TOKENS_TOTAL,
                  block_hash: str | None = None) -> SignedRecord:
        """A valid assignment of `n` requests to `executor` (request ids chosen to fit)."""
        block_hash = block_hash or state.latest_block_hash()
        jobs = state.jobs()
        ta = ta or (jobs[job_id].ta if job_id in jobs else "ta")
        rids = self.request_ids_for(state, job_id, executor, n, ta=ta, block_hash=block_hash)
        return self.assign(job_id, shard_id, executor, rids, ta,
                           max_tokens_total=max_tokens_total, block_hash=block_hash)

    def merkle_root(self, job_id: str, shard_id: str) -> str:
        return _h(f"root:{job_id}:{shard_id}")

    def commit(self, job_id: str, shard_id: str, executor: str, n_tokens: int = 100,
               n_requests: int = 2, merkle_root: str | None = None) -> SignedRecord:
        return sign_record(self.identity(executor), ArtifactBatchCommitted(
            job_id, shard_id, executor, merkle_root or self.merkle_root(job_id, shard_id),
            n_requests, n_tokens, _h("model"), _h(f"file:{job_id}:{shard_id}")))

    def deliver(self, job_id: str, ta: str = "ta") -> SignedRecord:
        return sign_record(self.identity(ta), OutputDelivered(job_id, _h(f"out:{job_id}"), 4, 0))

    def verdict(self, verifier: str, job_id: str, shard_id: str, executor: str,
                passed: bool = True, merkle_root: str | None = None, *,
                sample_block: str | None = None, checked: int = 2,
                failed: int | None = None) -> SignedRecord:
        """A verdict exactly as given; see `judge` for one by the assigned verifier."""
        return sign_record(self.identity(verifier), Verdict(
            job_id, shard_id, executor, merkle_root or self.merkle_root(job_id, shard_id),
            sample_block or self.genesis_hash, checked=checked,
            failed=(0 if passed else 1) if failed is None else failed, passed=passed))

    def judge(self, state: EpochState, job_id: str, shard_id: str, passed: bool = True, *,
              checked: int | None = None, failed: int | None = None) -> SignedRecord:
        """The verdict of the batch's assigned verifier, on its sample block; by default it
        checks every request and fails one of them if not `passed`."""
        sample, verifier = state.verification_duty(job_id, shard_id)
        b = state.batch(job_id, shard_id)
        n = len(b.request_ids)
        return self.verdict(verifier, job_id, shard_id, b.executor, passed, b.merkle_root,
                            sample_block=sample, checked=n if checked is None else checked,
                            failed=failed)

    def vote(self, state: EpochState, job_id: str, shard_id: str, member: str,
             passed: bool = False, *, checked: int | None = None, failed: int | None = None,
             evidence: dict[str, Any] | None = None,
             evidence_sha256: str | None = None) -> SignedRecord:
        """`member`'s dispute vote on the batch's open dispute, naming its dispute and sample
        blocks; by default it checks every request and fails one of them if not `passed`."""
        block, _ = state.dispute_panel(job_id, shard_id)
        b = state.batch(job_id, shard_id)
        n = len(b.request_ids)
        evidence = {"note": f"{member} re-checked {shard_id}"} if evidence is None else evidence
        return sign_record(self.identity(member), DisputeVote(
            job_id, shard_id, b.executor, b.merkle_root or "", b.sample_block or "", block,
            checked=n if checked is None else checked,
            failed=(0 if passed else 1) if failed is None else failed, passed=passed,
            evidence_sha256=evidence_sha256 or evidence_digest(evidence), evidence=evidence))

    def panel_votes(self, state: EpochState, job_id: str, shard_id: str,
                    passed: bool = False) -> list[SignedRecord]:
        """One vote by every member of the batch's dispute panel, all alike."""
        _, panel = state.dispute_panel(job_id, shard_id)
        return [self.vote(state, job_id, shard_id, m, passed) for m in panel]

    @staticmethod
    def next_block(state: EpochState) -> int:
        """Begin the next block on a bare state (prev: genesis, or a made-up hash); returns
        its height. Afterwards the state knows the hash of the block before it."""
        height = state.height + 1
        prev = state.genesis_hash if height == 1 else _h(f"block:{height - 1}")
        state.begin_block(height, prev)
        return height

    def close(self, validator: int = 0, epoch: int | None = None) -> SignedRecord:
        return sign_record(self.identity(self.validator_names[validator]),
                           EpochClose(self.genesis["epoch"] if epoch is None else epoch))

    # --- chains ---------------------------------------------------------------------------------

    def build_chain(self, chain_dir: Path, batches: Sequence[Sequence[RecordMaker]],
                    voters: list[int] | None = None) -> Chain:
        """A committed chain in `chain_dir`, one block per batch of records, signed offline
        (as if by consensus) by the validators in `voters` (all by default). A callable in a
        batch is called with the state (block begun, earlier records applied) to make its
        record, so it can depend on the chain so far (`assign_to`, `judge`)."""
        chain = Chain.open(chain_dir, self.genesis)
        state = EpochState.from_genesis(self.genesis)
        for batch in batches:
            height = chain.height + 1
            state.begin_block(height, chain.head_hash)
            records = []
            for item in batch:
                rec = item if isinstance(item, SignedRecord) else item(state)
                state.apply(rec)
                records.append(rec)
            proposer = self.validator_names[proposer_index(self.genesis["validators"], height,
                                                           0)]
            block = Block(height, 0, chain.head_hash, proposer,
                          tuple(r.to_dict() for r in records), state.state_hash())
            voters_ = range(len(self.validator_names)) if voters is None else voters
            votes = [sign_precommit(self.identity(self.validator_names[i]), i, block)
                     for i in voters_]
            chain.append(block, make_certificate(self.genesis["validators"], block, votes))
        return chain


def next_block_state(chain_dir: Path) -> EpochState:
    """The state of an audited chain dir as its next block will see it: the last block's hash
    is known (so `verification_duty` answers for commits in the last block)."""
    state = audit_chain(chain_dir).state
    height, head_hash = head(chain_dir)
    state.begin_block(height + 1, head_hash)
    return state
