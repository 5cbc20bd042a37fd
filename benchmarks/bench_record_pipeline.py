"""One validator's per-record work, stage by stage, in one process: where the CPU goes.

`bench_ledger.py` measures the validators as a whole; this replays what one of them does
with each `artifact_batch_committed` record, on the same state (160 jobs × 50 shards of 32
requests, assigned), without MPI or consensus, and prints CPU µs per record for each stage:

  decode+add          the inbox: bundle files read, lines decoded, mempool entries made
  verify              the one ed25519 verification per record (what the limit counts)
  prefetch-nonverify  the bookkeeping around it (key lookup, the cached-result check)
  propose             the proposer: trial state, records applied, state hash, block bytes
  parse               the others: the block cut into records at the proposer's lengths
  check_block         the others: the block re-applied and its state hash checked
  resolve             final records forgotten, bundle files moved to committed/

A validator proposes one block in four (4 validators), so its mean per record is about
decode+add + verify + prefetch + propose/4 + (parse + check_block) × 3/4 + resolve.
Run several copies at once to see what sharing the cores costs (`& ... & wait`).

Run: .venv/bin/python benchmarks/bench_record_pipeline.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import functools
import gc
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gonka_hpc.fileutil import atomic_write_bytes  # noqa: E402
from gonka_hpc.records import (  # noqa: E402
    ArtifactBatchCommitted,
    InferenceAssigned,
    SignedRecord,
    sign_record,
)
from ledger.block import Block, check_block, proposer_index  # noqa: E402
from ledger.mempool import Mempool  # noqa: E402
from ledger.sigcache import record_signed_by  # noqa: E402
from ledger.state import EpochState  # noqa: E402
from ledger.testkit import World  # noqa: E402

JOBS, SHARDS, REQUESTS = 160, 50, 32
BLOCK = 2000


def _held(pool: Mempool, rid: str) -> SignedRecord | None:
    """The record the pool holds under `rid` (what the validator gives `from_parts`)."""
    e = pool.entries.get(rid)
    return e.record if e is not None else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    w = World(n_validators=4, clients={"alice": 10**15})
    st = EpochState.from_genesis(w.genesis)
    st.begin_block(1, st.genesis_hash)
    st.apply(w.join("ta"))
    st.apply(w.join("exec"))
    prev = "12" * 32
    st.begin_block(2, prev)
    ta, ex = w.identity("ta"), w.identity("exec")
    for j in range(JOBS):
        st.apply(w.job(f"j{j}", escrow=10**12, n_requests=SHARDS * REQUESTS))
        for s in range(SHARDS):
            st.apply(sign_record(ta, InferenceAssigned(
                f"j{j}", f"s{s}", "exec",
                tuple(f"j{j}:{s * REQUESTS + i}" for i in range(REQUESTS)),
                REQUESTS * 10, "cd" * 32, prev)))
    st.state_hash()
    commits = [sign_record(ex, ArtifactBatchCommitted(
        f"j{j}", f"s{s}", "exec", w.merkle_root(f"j{j}", f"s{s}"), REQUESTS, REQUESTS * 8,
        "ab" * 32, "ef" * 32)) for j in range(JOBS) for s in range(SHARDS)]
    n = len(commits)
    stages = ("decode+add", "verify", "prefetch-nonverify", "propose", "parse",
              "check_block", "resolve")
    res: dict[str, list[float]] = {k: [] for k in stages}
    for _ in range(args.repeat):
        root = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
        inbox = root / "inbox"
        inbox.mkdir()
        for i in range(0, n, 1000):
            atomic_write_bytes(inbox / f"d-{i:07d}.jsonl",
                               b"\n".join(r.encode() for r in commits[i:i + 1000]) + b"\n")
        gc.collect()
        gc.freeze()
        gc.disable()  # as the validators do around bursts
        pool = Mempool(inbox)
        t = time.process_time()
        pool.refresh()
        res["decode+add"].append(time.process_time() - t)
        pub = st.pubkey("exec")
        assert pub is not None
        records = [e.record for e in pool.ordered()]
        t = time.process_time()
        for r in records:
            record_signed_by(pub, r)
        res["verify"].append(time.process_time() - t)
        t = time.process_time()
        for r in records:  # the same calls again: now answered from the record's cache
            record_signed_by(st.pubkey(r.signer) or "", r)
        res["prefetch-nonverify"].append(time.process_time() - t)
        state = st
        spent = dict.fromkeys(("propose", "parse", "check_block", "resolve"), 0.0)
        for b in range(0, n, BLOCK):
            h = 3 + b // BLOCK
            link = f"{h:064x}"
            who = state.validators[proposer_index(state.validators, h, 0)]["name"]
            t = time.process_time()
            trial = state.copy()
            trial.begin_block(h, link)
            accepted = []
            for e in pool.ordered()[:BLOCK]:
                if state.has_applied(e.rid) or trial.has_applied(e.rid):
                    continue
                trial.apply(e.record)
                accepted.append(e.record)
            block = Block.of_records(h, 0, link, who, accepted, trial.state_hash())
            raw, lengths = block.encode(), block.record_lengths
            spent["propose"] += time.process_time() - t
            t = time.process_time()
            parsed = Block.from_parts(raw, lengths, functools.partial(_held, pool))
            spent["parse"] += time.process_time() - t
            assert parsed is not None
            cut, decoded, rids = parsed
            t = time.process_time()
            state = check_block(state, cut, height=h, prev=link, decoded=decoded)
            spent["check_block"] += time.process_time() - t
            t = time.process_time()
            pool.resolve(rids)
            spent["resolve"] += time.process_time() - t
        for k, v in spent.items():
            res[k].append(v)
        gc.enable()
        shutil.rmtree(root)
    print(f"{n} records, CPU µs per record, {args.repeat} runs:")
    for k in stages:
        print(f"  {k:20s} " + " ".join(f"{1e6 * x / n:7.1f}" for x in res[k]))
    mean = {k: min(v) / n * 1e6 for k, v in res.items()}
    per = (mean["decode+add"] + mean["verify"] + mean["prefetch-nonverify"]
           + mean["propose"] / 4 + (mean["parse"] + mean["check_block"]) * 3 / 4
           + mean["resolve"])
    print(f"  one validator's mean (best runs): {per:.1f} µs per record, of which "
          f"{per - mean['verify']:.1f} µs besides the verification")


if __name__ == "__main__":
    main()
