"""`gonka-hpc epoch`: the command line of an epoch run as a chain of Slurm jobs.

The parser is kept light (no ledger, torch or h5py imports) because every `gonka-hpc` call,
ML nodes included, builds it; the work lives in gonka_hpc.cli.epoch_stages.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..slurm_epoch import STAGES, TEARDOWN

EPILOG = """\
An epoch on a Slurm cluster is six jobs chained with --dependency: validators (one MPI job),
assign (escrow, executors, spools), nodes (the ML-node array, preemptible), finalize (commits
final, outputs delivered), verify (the verifier array), settle (rewards, refunds, audit). A
failed stage makes Slurm cancel the stages after it, and a teardown job stops the validators.
Everything lives in the epoch dir, which must be on storage every node sees. Each ML node
runs with its participant's engine settings from the config (engine, dtype, max_num_seqs,
...); --node-args overrides them for every node, and is checked before anything is submitted.

examples:
  gonka-hpc epoch schedule jobs/quickstart.jsonl --dir /scratch/gonka/e1 --nodes 4 \\
      --node-partition gpu --node-qos preemptible --node-gres gpu:4 \\
      --node-args="--engine vllm --batch-size 64"
      prepare the epoch dir, submit the stages, print their job ids
  gonka-hpc epoch schedule jobs/quickstart.jsonl --dir /scratch/gonka/e1 --dry-run
      check the job file (bad lines are listed), prepare DIR and write the batch scripts
      under DIR/sbatch/, one per stage, and list them; submit nothing (to submit, run it
      again without --dry-run on a new --dir)
  gonka-hpc epoch status --dir /scratch/gonka/e1
      each stage's state (from slurmctld and sacct), and why one failed
  gonka-hpc epoch cancel --dir /scratch/gonka/e1
"""


def add_parser(sub: Any) -> None:
    p = sub.add_parser("epoch", help="run an epoch as Slurm jobs: schedule, status, cancel",
                       description="Run one epoch on a Slurm cluster as a chain of jobs.",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    esub = p.add_subparsers(dest="epoch_command", required=True, metavar="SUBCOMMAND")
    s = esub.add_parser("schedule", help="prepare an epoch dir and submit its stages",
                        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    s.add_argument("jobfile", type=Path, help="OpenAI Batch JSONL job file")
    s.add_argument("--dir", type=Path, required=True,
                   help="epoch dir on shared storage (new or empty)")
    s.add_argument("--config", type=Path, default=None,
                   help="network config YAML (default: the embedded configs/quickstart.yaml)")
    s.add_argument("--client", default=None, help="client account (default: the first)")
    s.add_argument("--nodes", type=int, default=1, help="ML-node array size (default 1)")
    s.add_argument("--verifiers", type=int, default=1, help="verifier array size (default 1)")
    s.add_argument("--partition", default=None, help="partition for every stage")
    s.add_argument("--account", default=None, help="account for every stage")
    s.add_argument("--node-partition", default=None,
                   help="partition of the ML nodes only (default: --partition)")
    s.add_argument("--node-qos", default=None,
                   help="QOS of the ML nodes only, e.g. a preemptible one")
    s.add_argument("--node-gres", default=None, metavar="GRES",
                   help='GRES per ML-node task, e.g. "gpu:4"')
    s.add_argument("--node-cpus", type=int, default=1, help="CPUs per ML-node task")
    s.add_argument("--node-time", default="04:00:00", help="time limit of one ML-node run")
    s.add_argument("--node-args", default="", metavar="ARGS",
                   help='extra `gonka-hpc node` flags; write it with "=": '
                   '--node-args="--engine vllm"')
    s.add_argument("--dry-run", action="store_true",
                   help="prepare the dir and write the scripts, but submit nothing")
    for name, text, example in (
            ("status", "each stage's state and why",
             "  gonka-hpc epoch status --dir /scratch/gonka/e1\n"
             "      one line per stage: its job id, its state (from slurmctld, then sacct),\n"
             "      and why it failed; the epoch summary once settled. Exit code 0: settled,\n"
             "      1: still running, 2: a stage failed\n"
             "  gonka-hpc epoch status --dir /scratch/gonka/e1 --json"),
            ("cancel", "cancel every stage's job",
             "  gonka-hpc epoch cancel --dir /scratch/gonka/e1\n"
             "      scancel the stages that have not ended; the chains stay crash-safe")):
        x = esub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".",
                            epilog="examples:\n" + example,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        x.add_argument("--dir", type=Path, required=True, help="the epoch dir")
        if name == "status":
            x.add_argument("--json", action="store_true", help="machine-readable output")
    st = esub.add_parser("stage", help="run one stage's body (what the Slurm jobs call)",
                         description="Run one stage's body in an epoch dir: what the batch "
                         "scripts of `epoch schedule` call (see DIR/sbatch/ after a dry run).",
                         epilog="examples:\n  gonka-hpc epoch stage assign --dir "
                         "/scratch/gonka/e1\n  gonka-hpc epoch stage verify --dir "
                         "/scratch/gonka/e1 --task 0 --tasks 4",
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    st.add_argument("name", choices=[s for s in STAGES if s not in ("validators", "nodes")]
                    + [TEARDOWN])
    st.add_argument("--dir", type=Path, required=True, help="the epoch dir")
    st.add_argument("--task", type=int, default=None,
                    help="verify: this task's index (default $SLURM_ARRAY_TASK_ID or 0)")
    st.add_argument("--tasks", type=int, default=None,
                    help="verify: number of tasks (default $SLURM_ARRAY_TASK_COUNT or 1)")


def run_command(args: argparse.Namespace) -> int:
    from . import epoch_stages as es

    if args.epoch_command == "schedule":
        return es.schedule(args)
    if args.epoch_command == "status":
        return es.status(args.dir, as_json=args.json)
    if args.epoch_command == "cancel":
        from ..slurm_epoch import cancel, job_ended, load_jobs

        jobs = load_jobs(args.dir)
        live = {stage: jid for stage, jid in jobs.items() if not job_ended(jid)}
        if not live:
            print(f"every stage of {args.dir} has ended; nothing to cancel")
            return 0
        cancel(live)
        print(f"cancelled {', '.join(f'{s} ({j})' for s, j in live.items())}")
        return 0
    return es.STAGE_BODIES[args.name](args)
