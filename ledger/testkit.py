"""A deterministic toy network for tests and demos: keys, genesis and signed records.

`World` derives every key from a seed string, builds a genesis document in the format of
`gonka_hpc.config.genesis`, and signs well-formed records with one short call each, so tests
read as the story of an epoch. Not used by the validators themselves.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from gonka_hpc.canonical import sha256_hex
from gonka_hpc.identity import Identity
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
    sign_record,
)

from .block import Block, make_certificate, proposer_index, sign_precommit
from .chain import Chain
from .state import EpochState


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

    def assign(self, job_id: str, shard_id: str, executor: str,
               request_ids: tuple[str, ...] = ("r0", "r1"), ta: str = "ta") -> SignedRecord:
        return sign_record(self.identity(ta), InferenceAssigned(
            job_id, shard_id, executor, tuple(request_ids), _h(f"shard:{job_id}:{shard_id}"),
            _h("block")))

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
                passed: bool = True, merkle_root: str | None = None) -> SignedRecord:
        return sign_record(self.identity(verifier), Verdict(
            job_id, shard_id, executor, merkle_root or self.merkle_root(job_id, shard_id),
            _h("block"), checked=2, failed=0 if passed else 1, passed=passed))

    def close(self, validator: int = 0, epoch: int | None = None) -> SignedRecord:
        return sign_record(self.identity(self.validator_names[validator]),
                           EpochClose(self.genesis["epoch"] if epoch is None else epoch))

    # --- chains ---------------------------------------------------------------------------------

    def build_chain(self, chain_dir: Path, batches: list[list[SignedRecord]],
                    voters: list[int] | None = None) -> Chain:
        """A committed chain in `chain_dir`, one block per batch of records, signed offline
        (as if by consensus) by the validators in `voters` (all by default)."""
        chain = Chain.open(chain_dir, self.genesis)
        state = EpochState.from_genesis(self.genesis)
        for batch in batches:
            for rec in batch:
                state.apply(rec)
            height = chain.height + 1
            proposer = self.validator_names[proposer_index(height, 0, len(self.validator_names))]
            block = Block(height, 0, chain.head_hash, proposer,
                          tuple(r.to_dict() for r in batch), state.state_hash())
            voters_ = range(len(self.validator_names)) if voters is None else voters
            votes = [sign_precommit(self.identity(self.validator_names[i]), i, block)
                     for i in voters_]
            chain.append(block, make_certificate(self.genesis["validators"], block, votes))
        return chain
