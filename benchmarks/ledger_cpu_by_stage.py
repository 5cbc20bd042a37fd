"""Where each validator's CPU goes inside the real ledger bench, stage by stage.

`bench_record_pipeline.py` replays one validator's record pipeline in one process; this
measures the real thing: 4 MPI ranks sharing the cores, consensus included. It is a runner
for `bench_ledger.py` (BENCH_LEDGER_RUNNER): it wraps the validator's stages so that each
rank charges its CPU time (`time.process_time`, exclusive: a stage called inside another is
charged to the inner one) to the stage it is in, starts counting when the bench signals the
measured window (BENCH_LEDGER_SIGNAL=10, SIGUSR1), and writes its totals LEDGER_CPU_S
seconds later (default 2.2, about the window of the default 8,000 records). The wrappers
cost about 1 µs per record, charged mostly to VERIFY and prefetch-rest.

  VERIFY         ed25519 verifications of records, with the key lookup and signing bytes
  decode+add     inbox files read, lines decoded, mempool entries made
  prefetch-rest  the loop around the prefetch verifications
  propose        the proposer's trial block (state_hash and state.copy apart)
  check_block    the others' block check (state_hash and state.copy apart)
  parse          a proposal cut into records; pump: messages received (votes verified)
  other          the main loop itself

Run:
  BENCH_LEDGER_RUNNER=benchmarks/ledger_cpu_by_stage.py BENCH_LEDGER_SIGNAL=10 \\
      .venv/bin/python benchmarks/bench_ledger.py
  .venv/bin/python benchmarks/ledger_cpu_by_stage.py --summary 8000
(LEDGER_CPU_OUT sets the folder for the per-rank totals, default /tmp/ledger-cpu-by-stage.)
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
OUT = Path(os.environ.get("LEDGER_CPU_OUT", "/tmp/ledger-cpu-by-stage"))


def summarize(n_records: int) -> None:
    """Print the ranks' totals: seconds, share, and µs per record and validator."""
    totals: dict[str, float] = {}
    ranks = sorted(OUT.glob("rank-*.json"))
    if not ranks:
        sys.exit(f"no totals in {OUT}: run bench_ledger.py with this runner first")
    for f in ranks:
        for k, v in json.loads(f.read_text()).items():
            totals[k] = totals.get(k, 0.0) + v
    total = sum(totals.values())
    per = 1e6 / n_records / len(ranks)
    print(f"{len(ranks)} ranks, {n_records} records: {total:.2f} CPU-s, "
          f"{total * per:.1f} µs per record and validator")
    for k, v in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"  {k:14s} {v:7.3f} s {100 * v / total:5.1f}%  {v * per:6.1f} µs")


def run_validator(argv: list[str]) -> None:
    sys.path.insert(0, str(REPO))
    import ledger.chain as chain_mod
    import ledger.consensus as consensus
    import ledger.mempool as mempool
    import ledger.rounds as rounds
    import ledger.sigcache as sigcache
    import ledger.state as state_mod
    from ledger.__main__ import main

    clock = time.process_time
    spent: dict[str, float] = {}
    stack = ["other"]
    last = [clock()]

    def charge() -> None:
        now = clock()
        spent[stack[-1]] = spent.get(stack[-1], 0.0) + now - last[0]
        last[0] = now

    def wrap(owner: Any, name: str, stage: str) -> None:
        inner = getattr(owner, name)

        @functools.wraps(inner)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            charge()
            stack.append(stage)
            try:
                return inner(*args, **kwargs)
            finally:
                charge()
                stack.pop()
        setattr(owner, name, wrapped)

    for owner, name, stage in (
            (mempool.Mempool, "refresh", "decode+add"), (mempool.Mempool, "resolve", "resolve"),
            (consensus.Validator, "prefetch", "prefetch-rest"),
            (consensus.Validator, "_fresh_block", "propose"),
            (consensus.Validator, "_parse_block", "parse"),
            (consensus.Validator, "valid", "check_block"),
            (consensus.Validator, "_commit", "commit"), (consensus.Validator, "pump", "pump"),
            (consensus.Validator, "_flush", "flush"),
            (consensus.Validator, "has_work", "has_work"),
            (consensus.Validator, "_next_height", "next_height"),
            (rounds.Height, "tick", "tick"), (chain_mod.Chain, "append", "chain.append"),
            (state_mod.EpochState, "copy", "state.copy"),
            (state_mod.EpochState, "state_hash", "state_hash")):
        wrap(owner, name, stage)
    signed_by = sigcache.record_signed_by

    def verify(public_hex: str, record: Any) -> bool:
        if record.__dict__.get("_signed_by") == public_hex:
            return True  # a cache hit is the caller's stage, not a verification
        charge()
        stack.append("VERIFY")
        try:
            return signed_by(public_hex, record)
        finally:
            charge()
            stack.pop()
    consensus.record_signed_by = verify  # type: ignore[assignment]
    state_mod.record_signed_by = verify  # type: ignore[assignment]

    rank = os.environ.get("PMI_RANK", str(os.getpid()))
    if rank == "0":  # totals of an earlier run (maybe more ranks) must not mix in
        for old in OUT.glob("rank-*.json"):
            old.unlink(missing_ok=True)
    seconds = float(os.environ.get("LEDGER_CPU_S", "2.2"))

    def write() -> None:
        charge()
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / f"rank-{rank}.json").write_text(json.dumps(spent))

    def start(*_: Any) -> None:
        charge()
        spent.clear()
        threading.Timer(seconds, write).start()

    signal.signal(signal.SIGUSR1, start)
    main(argv)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--summary"]:
        summarize(int(sys.argv[2]))
    else:
        run_validator(sys.argv[1:])
