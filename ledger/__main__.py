"""`python -m ledger`: run the validators (an MPI job) or audit their chains.

`main(argv)` is a plain function tests call directly; domain errors become `ERROR ...` on
stderr and exit code 1 (verify-chain) or the error's code; tracebacks are for bugs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gonka_hpc.errors import GonkaError

from .audit import (
    AuditResult,
    agreement,
    audit_chain,
    chain_dirs_of,
    check_head_file,
    compare_dirs,
    expand_data_dirs,
    genesis_of_data_dir,
    state_of,
)
from .block import InvalidBlock
from .chain import ChainError, load_genesis_file
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
For each chain dir: every line is the canonical encoding of its block, every block hash, prev
link, proposer, commit certificate (> 2/3 of the genesis validators' weight, every
signature), and a full replay of the state (every record's signature and transition, every
block's state_hash). Prints one OK line per dir on stdout, or an ERROR line on stderr naming
the height and what failed.

A DIR without chain.log is a data dir: it must hold validator-<i>/ (with its chain.log) for
every validator i of genesis (each one missing is an ERROR), no chain may end before the
height and hash that DATA/head.json names (when it is there), and the chains must agree:
genesis.json byte-identical, the same blocks (certificates may differ; each validator stores
the precommits it collected). Several DIRs are compared the same way.

Which genesis: without --genesis, each dir is checked against the genesis.json it holds (a
chain only proves it is valid for that genesis; a data dir's validator count comes from its
first chain dir). With --genesis FILE, every dir's genesis.json must be that document (an
ERROR otherwise) and FILE says which validators a data dir must hold: pin it when you audit
chains you did not write.

A torn tail (bytes after the last newline: a validator crashed, or is appending right now)
is not a block: it is reported on the OK line ("N torn tail bytes ignored") and ignored, exit
0; with --strict it is an ERROR. A bad line anywhere else is always an ERROR.

Exit code 0 if everything checks out, 1 otherwise.

examples:
  python -m ledger verify-chain vdata/validator-0
  python -m ledger verify-chain vdata/            # all validators, and that they agree
  python -m ledger verify-chain --genesis net/genesis.json --strict vdata/
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
    ver.add_argument("--genesis", type=Path, default=None, metavar="FILE",
                     help="the network's genesis.json: every dir must hold it, and a data "
                          "dir must hold a chain for each of its validators")
    ver.add_argument("--strict", action="store_true",
                     help="a torn tail (a half-written last line) is an ERROR, not ignored")
    return parser


def verify_chain(dirs: list[Path], *, genesis_file: Path | None = None,
                 strict: bool = False) -> int:
    """Audit chain dirs (and data dirs of them); OK lines on stdout, ERROR lines on stderr."""
    problems: list[str] = []
    pinned = None
    if genesis_file is not None:
        try:
            pinned = load_genesis_file(genesis_file)
            state_of(pinned, genesis_file)
        except ChainError as exc:
            print(f"ERROR {exc}", file=sys.stderr)
            return 1
    chain_dirs: list[Path] = []
    data_dirs: list[tuple[Path, list[Path]]] = []
    for data_dir, subs in expand_data_dirs(dirs):
        if data_dir is None:
            chain_dirs.extend(subs)
            continue
        try:
            genesis = genesis_of_data_dir(data_dir, subs, pinned)
            where = genesis_file if genesis_file is not None else subs[0] / "genesis.json"
            n = len(state_of(genesis, where).validators)
        except ChainError as exc:
            problems.append(str(exc))
            chain_dirs.extend(subs)
            continue
        found, missing = chain_dirs_of(data_dir, n)
        problems += missing
        chain_dirs.extend(found)
        data_dirs.append((data_dir, found))
    for p in problems:
        print(f"ERROR {p}", file=sys.stderr)
    results: dict[Path, AuditResult] = {}
    for d in chain_dirs:
        try:
            result = audit_chain(d, expected_genesis=pinned, genesis_source=str(genesis_file))
        except InvalidBlock as exc:
            problems.append(f"{d}: height {exc.height}: {exc.reason}")
        except GonkaError as exc:
            msg = str(exc)
            problems.append(msg if msg.startswith(str(d)) else f"{d}: {msg}")
        else:
            if not (strict and result.torn_bytes):
                print(result.summary())
                results[d] = result
                continue
            problems.append(f"{d}: {result.torn_bytes} bytes after the last whole line "
                            f"(height {result.height}): a torn tail (--strict)")
        print(f"ERROR {problems[-1]}", file=sys.stderr)
    for data_dir, found in data_dirs:
        for p in check_head_file(data_dir, [results[d] for d in found if d in results]):
            problems.append(p)
            print(f"ERROR {p}", file=sys.stderr)
    if problems or len(chain_dirs) < 2:
        return 1 if problems else 0
    mismatch = compare_dirs(chain_dirs)
    for p in mismatch:
        print(f"ERROR not identical: {p}", file=sys.stderr)
    if mismatch:
        return 1
    print(f"OK {agreement([results[d] for d in chain_dirs])}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "verify-chain":
            return verify_chain(args.dirs, genesis_file=args.genesis, strict=args.strict)
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
