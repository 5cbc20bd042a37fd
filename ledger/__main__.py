"""`python -m ledger`: run the validators (an MPI job) or audit their chains.

`main(argv)` is a plain function tests call directly; domain errors become `ERROR ...` on
stderr and exit code 1 (verify-chain) or the error's code; tracebacks are for bugs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gonka_hpc.errors import GonkaError

from .audit import audit_chain, compare_dirs, expand_dirs, identical_logs
from .block import InvalidBlock
from .faults import BEHAVIOURS

DESCRIPTION = """\
The gonka-hpc validators: an MPI job with one rank per genesis validator that finalizes signed
records (participants, jobs, assignments, artifact batches, verdicts, epoch close) into an
append-only chain, and the auditor that re-checks a chain offline.

examples:
  mpiexec -n 4 python -m ledger run --genesis net/genesis.json --keys net/keys \\
      --data net/validators --inbox net/inbox
  srun --mpi=pmi2 -n 4 python -m ledger run --genesis G.json --keys K --data D --inbox I
  touch net/inbox/STOP                  # validators finish pending records, then exit 0
  python -m ledger verify-chain net/validators      # every validator-*/ chain under it
"""

RUN_HELP = """\
Rank r is validator r of genesis: it loads KEYS/validator-<r>.key and keeps its chain in
DATA/validator-<r>/ (chain.log + genesis.json); rank 0 keeps DATA/head.json {"height","hash"}
up to date. Heights are decided by Tendermint rounds (propose, prevote, precommit; proposer
chosen by weight; > 2/3 of the weight commits) over point-to-point MPI messages. Records are
picked up from INBOX (files <record_id>.json, as gonka_hpc.inbox.post writes them, or
<name>.jsonl bundles with one record per line); records that can never be valid move to
INBOX/rejected/ with a .reason file, final ones to INBOX/committed/. Create INBOX/STOP to
make the job exit 0 once nothing valid is pending at any validator (STOP is not removed:
delete it before restarting). Restarting on the same DATA resumes at the stored height; a
validator that is behind catches up first, and one that falls behind while running (it was
silent, or slow) fetches the blocks it missed from a peer.

The world size must equal the number of genesis validators (a wrong launcher silently
starts N one-rank worlds; this fails loudly instead).

examples:
  mpiexec -n 4 python -m ledger run --genesis G.json --keys keys/ --data vdata/ --inbox inbox/
  mpiexec -n 4 python -m ledger run ... --interval 0.01 --expect-size 4
"""

VERIFY_HELP = """\
For each chain dir: every block hash, prev link, proposer, commit certificate (> 2/3 of the
genesis validators' weight, every signature), and a full replay of the state (every record's
signature and transition, every block's state_hash). Prints one OK line per dir, or an ERROR
naming the height and what failed. With several dirs, also checks that their chain.log and
genesis.json agree: the same blocks (certificates may differ; each validator stores the
precommits it collected). A DIR without chain.log stands for its validator-*/ subdirs.
Exit code 0 if everything checks out, 1 otherwise.

examples:
  python -m ledger verify-chain vdata/validator-0
  python -m ledger verify-chain vdata/            # all validators, and that they agree
"""


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="python -m ledger", description=DESCRIPTION,
                                     formatter_class=fmt)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="run the validators (one MPI rank per validator)",
                         description=RUN_HELP, formatter_class=fmt)
    run.add_argument("--genesis", type=Path, required=True, help="genesis.json of the network")
    run.add_argument("--keys", type=Path, required=True,
                     help="dir with validator-<r>.key for every rank r")
    run.add_argument("--data", type=Path, required=True,
                     help="dir that holds validator-<r>/ chain dirs and head.json")
    run.add_argument("--inbox", type=Path, required=True, help="dir of signed record files")
    run.add_argument("--interval", type=float, default=0.05,
                     help="seconds to idle when nothing is pending (default 0.05)")
    run.add_argument("--expect-size", type=int, default=None,
                     help="also require exactly N MPI ranks")
    run.add_argument("--max-block-records", type=int, default=1000,
                     help="most records in one block (default 1000)")
    run.add_argument("--timeout-scale", type=float, default=1.0,
                     help="multiply every round timeout (propose 1 s + 0.5 s/round, prevote "
                          "and precommit 0.5 s + 0.25 s/round, commit wait 0.5 s) by this")
    run.add_argument("--fault-injection", type=Path, default=None, metavar="FILE",
                     help="TEST ONLY: JSON {rank: {behaviour: ...}} making ranks misbehave "
                          f"({', '.join(BEHAVIOURS)}); see ledger/faults.py. Never in "
                          "production.")
    ver = sub.add_parser("verify-chain", help="audit validator chain dirs offline",
                         description=VERIFY_HELP, formatter_class=fmt)
    ver.add_argument("dirs", nargs="+", type=Path, metavar="DIR")
    return parser


def verify_chain(dirs: list[Path]) -> int:
    ok = True
    expanded = expand_dirs(dirs)
    for d in expanded:
        try:
            print(audit_chain(d).summary())
        except InvalidBlock as exc:
            ok = False
            print(f"ERROR {d}: height {exc.height}: {exc.reason}")
        except GonkaError as exc:
            ok = False
            print(f"ERROR {d}: {exc}")
    if ok and len(expanded) > 1:
        problems = compare_dirs(expanded)
        for p in problems:
            print(f"ERROR not identical: {p}")
        if problems:
            ok = False
        elif identical_logs(expanded):
            print(f"OK {len(expanded)} chain dirs are byte-identical")
        else:
            print(f"OK {len(expanded)} chain dirs hold the same blocks (their certificates "
                  "differ: each validator keeps the precommits it collected)")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "verify-chain":
            return verify_chain(args.dirs)
        from .consensus import RunConfig, run  # MPI starts only for `run`
        from .rounds import Timeouts

        if args.timeout_scale <= 0 or args.max_block_records < 1:
            raise GonkaError("--timeout-scale must be > 0 and --max-block-records >= 1")
        return run(RunConfig(args.genesis, args.keys, args.data, args.inbox, args.interval,
                             args.expect_size, args.max_block_records,
                             Timeouts().scaled(args.timeout_scale), args.fault_injection))
    except GonkaError as exc:
        print(f"ERROR {exc}", file=sys.stderr)
        return exc.exit_code


def entrypoint() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entrypoint()
