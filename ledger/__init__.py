"""The validators: the epoch state machine, blocks, the append-only chain and MPI consensus.

Modules, bottom up:
- `state`: the deterministic epoch state machine (participants, balances, escrow, jobs,
  verdicts, settlement). Pure: no I/O, no clocks, no randomness.
- `votes`, `sigcache`: what validators sign (votes, proposals), and signatures verified once.
- `proposer`: who proposes at (height, round), by weight.
- `block`: blocks, precommit votes and commit certificates, and the check of one block
  against the state before it.
- `chain`: the append-only, crash-safe chain file of one validator, and its readers.
- `audit`: offline verification of a chain dir (what `python -m ledger verify-chain` runs).
- `rounds`: one height of Tendermint consensus as a pure state machine.
- `mempool`, `faults`: the inbox as a validator sees it; test-only fault injection.
- `consensus`: the validators as one MPI job, one rank per validator (see docs/ledger.md).

Only `consensus` imports mpi4py, so auditing a chain never starts MPI.
"""
