"""`gonka-hpc`: the command line. `main(argv)` is a plain function that tests call directly;
`entrypoint()` is the console script. Domain errors become `ERROR ...` on stderr and a
documented exit code; anything else is a bug and keeps its traceback.

Exit codes: 0 ok; 2 bad input, bad setup or a failed stage (the message names it and its
log); 3 a signature failure or an audit finding; 75 (`node` only) stopped by SIGUSR2/SIGTERM
after checkpointing: run it again to resume; 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import GonkaError
from ..slurm_epoch import CONFIG_ENV

if TYPE_CHECKING:
    from ..config import EngineOptions, ParticipantConfig

EPILOG_RUN = """\
examples:
  gonka-hpc run jobs/quickstart.jsonl
      one epoch on the embedded quickstart network (3 participants, 4 MPI validators);
      outputs, artifacts, chains and the summary go under runs/<time>/
  gonka-hpc run jobs/quickstart.jsonl --cheater dc-c
      dc-c generates with a smaller model and reports the real model's logprobs (the
      pre-fill attack); watch it being caught, forfeiting, and its clients refunded
  gonka-hpc run my.jsonl --config configs/quickstart.yaml --out /scratch/epoch1

The outputs are OUT/outputs/<job file stem>.output.jsonl, one line per non-blank input line
in input order (vllm run-batch shape); a bad line is answered with an error naming its line
and field, and every other line runs. Formats: docs/formats.md.
"""

EPILOG_MODEL = """\
The network model is built locally from nothing (no downloads): a byte-level BPE tokenizer and
a small Llama-style model trained briefly on generated text, deterministically, so the same
content hash comes out on every machine. It is cached under $GONKA_HOME (default
~/.cache/gonka-hpc).

examples:
  gonka-hpc model create               build (or find) gonka-tiny and print its content hash
  gonka-hpc model create gonka-tiny-small
"""

EPILOG_NODE = """\
An ML node runs the shards waiting in its spool: generates with seeded verifiable sampling,
writes output lines and a signed HDF5 artifact batch per shard, and commits the batch's
Merkle root to the validators' inbox. Restarting it skips completed shards.

Preemption-safe: each finished engine batch is checkpointed under out/<shard>.partial/, and a
restarted node resumes from there. On SIGUSR2 or SIGTERM it finishes the batch in flight,
checkpoints it and exits with code 75 (on vLLM, whose batch never drains, it checkpoints what
has finished and drops the rest); every request still ends up answered exactly once.
Under Slurm, run it through slurm/gonka_node.sh, which requeues the task.

Engine settings: --engine vllm with --dtype (the network's declared precision class, float32
today), --tensor-parallel-size N (GPUs per model copy; default $GONKA_TENSOR_PARALLEL_SIZE,
which slurm/gonka_node.sh sets from --gres=gpu:N, else 1), --pipeline-parallel-size,
--max-num-seqs and --gpu-memory-utilization.
With --config NETWORK.yaml (default $GONKA_NETWORK_CONFIG, which `gonka-hpc epoch schedule`
sets for its nodes) the defaults are the engine fields of the participant entry named like
the key's identity; flags override them. The reference engine takes dtype and max-num-seqs
(its batch size) and refuses parallelism > 1.

examples:
  gonka-hpc node --spool runs/X/spool/uni-b --key runs/X/keys/uni-b.key --inbox runs/X/inbox
  GONKA_TENSOR_PARALLEL_SIZE=4 gonka-hpc node --engine vllm --dtype float32 \\
      --gpu-memory-utilization 0.85 --spool ... --key ... --inbox ...
"""

TP_ENV = "GONKA_TENSOR_PARALLEL_SIZE"
"""Default of `gonka-hpc node --tensor-parallel-size` (slurm/gonka_node.sh maps --gres=gpu:N)."""
TP_ENV_WHY = f"${TP_ENV}, which slurm/gonka_node.sh sets from --gres=gpu:N"


@contextlib.contextmanager
def error_boundary() -> Iterator[None]:
    try:
        yield
    except GonkaError as exc:
        print(f"ERROR {exc}", file=sys.stderr)
        raise SystemExit(exc.exit_code) from None
    except KeyboardInterrupt:
        print("ERROR interrupted", file=sys.stderr)
        raise SystemExit(130) from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gonka-hpc",
        description="Decentralized, verifiable LLM inference on HPC clusters.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="start here:  gonka-hpc run jobs/quickstart.jsonl\n"
               "each command has --help with examples.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run one whole epoch on this machine (no Slurm)",
                         description="Run one epoch end to end on one machine: submit the job "
                         "file, assign it to executors, run the ML nodes, finalize on MPI "
                         "validators, verify, settle, and print the epoch summary.",
                         epilog=EPILOG_RUN, formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("jobfile", type=Path, help="OpenAI Batch JSONL job file")
    run.add_argument("--config", type=Path, default=None,
                     help="network config YAML (default: configs/quickstart.yaml)")
    run.add_argument("--out", type=Path, default=None,
                     help="output dir (default: runs/<UTC time>); must not exist or be empty")
    run.add_argument("--client", default=None, help="client account submitting the job "
                     "(default: the config's first client)")
    run.add_argument("--cheater", default=None, metavar="PARTICIPANT",
                     help="make this participant generate with a smaller model and claim the "
                     "real one (pre-fill attack)")
    run.add_argument("--quiet", action="store_true", help="no progress bars")

    model = sub.add_parser("model", help="build and inspect the local network model",
                           description="Build and inspect the network's local model.",
                           epilog=EPILOG_MODEL,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    msub = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    create = msub.add_parser("create", help="build the model (cached) and print its hash",
                             description="Build a network model from nothing (or find it in "
                             "the cache) and print its content hash.", epilog=EPILOG_MODEL,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    create.add_argument("name", nargs="?", default="gonka-tiny",
                        help="which model (default gonka-tiny, the network's; an unknown "
                        "name lists the known ones)")
    create.add_argument("--force", action="store_true", help="rebuild even if cached")
    create.add_argument("--data-dir", type=Path, default=None,
                        help="cache dir (default: $GONKA_HOME or ~/.cache/gonka-hpc)")

    node = sub.add_parser("node", help="run the shards waiting in an ML node's spool",
                          description="Run an ML node over its spool once.", epilog=EPILOG_NODE,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    node.add_argument("--spool", type=Path, required=True, help="this executor's spool dir")
    node.add_argument("--key", type=Path, required=True, help="this executor's key file")
    node.add_argument("--inbox", type=Path, required=True, help="the validators' inbox dir")
    node.add_argument("--model", default="gonka-tiny", help="network model name")
    node.add_argument("--data-dir", type=Path, default=None, help="model cache dir")
    node.add_argument("--batch-size", type=int, default=None,
                      help="requests per engine batch, each checkpointed when done (default: "
                      "the engine's: 16 for the reference engine, 8 x max-num-seqs for vLLM)")
    node.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    node.add_argument("--config", type=Path, default=None, metavar="NETWORK.yaml",
                      help="network config whose participant entry (named like the key's "
                      f"identity) gives the engine settings' defaults (default: ${CONFIG_ENV})")
    node.add_argument("--engine", choices=["reference", "vllm", "auto"], default=None,
                      help="inference engine: the reference torch engine, vLLM, or auto (vLLM "
                      "when it imports); both sample the same seeded tokens (default: the "
                      "participant's, else reference)")
    node.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                      help="model dtype (default float32): run the precision the network "
                      "declares (configs/verification.yaml); another one fails verification")
    node.add_argument("--tensor-parallel-size", type=int, default=None, metavar="N",
                      help=f"vLLM: GPUs one model copy is split over (default: ${TP_ENV}, "
                      "set by slurm/gonka_node.sh from --gres=gpu:N, else 1)")
    node.add_argument("--pipeline-parallel-size", type=int, default=None, metavar="N",
                      help="vLLM: pipeline stages of one model copy (default 1)")
    node.add_argument("--max-num-seqs", type=int, default=None, metavar="N",
                      help="sequences decoded together (default 16)")
    node.add_argument("--gpu-memory-utilization", type=float, default=None, metavar="F",
                      help="vLLM on GPU: fraction of GPU memory vLLM may take (default 0.9)")
    node.add_argument("--cheat-with", default=None, metavar="MODEL",
                      help="(demo/test only) generate with MODEL, report the network model's "
                      "logprobs: the pre-fill attack")
    sub.add_parser("calibrate", add_help=False,
                   help="calibrate the verification thresholds from honest and attack runs "
                   "(`gonka-hpc calibrate --help`)")
    from .epoch import add_parser as add_epoch_parser

    add_epoch_parser(sub)

    from .audit import add_parser as add_audit_parser  # light: its heavy imports are lazy

    add_audit_parser(sub)
    return p


def _cmd_audit(args: argparse.Namespace) -> int:
    from .audit import run_command

    return run_command(args)


def _cmd_model(args: argparse.Namespace) -> int:
    from ..model import MODEL_SPECS, create_model

    if args.name not in MODEL_SPECS:
        raise GonkaError(f"unknown model '{args.name}'; known: {', '.join(MODEL_SPECS)}")
    info = create_model(args.name, args.data_dir, force=args.force)
    print(f"{info.name}  {info.content_hash}  {info.path}")
    return 0


def node_parser() -> argparse.ArgumentParser:
    """The `gonka-hpc node` parser alone (`epoch schedule` checks its --node-args with it)."""
    sub = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["node"]


def _engine_options(args: argparse.Namespace, site: ParticipantConfig | None = None,
                    site_label: str = "", *, flag_prefix: str = "",
                    tp_default: tuple[str, str, str] | None = None) -> EngineOptions:
    """The node's `config.EngineOptions`: its flags, else the fields its participant entry
    `site` sets (`site_label` says where), else the tensor parallelism Slurm gave the task
    ($GONKA_TENSOR_PARALLEL_SIZE; or `tp_default`, (value, source, why), for a check made
    before the job runs), else the defaults. A bad value names where it came from."""
    from pydantic import ValidationError as PydanticError

    from ..config import EngineOptions
    from ..errors import ValidationError

    given: dict[str, object] = {}
    source: dict[str, str] = {}
    why: dict[str, str] = {}
    for name in EngineOptions.model_fields:
        if getattr(args, name) is not None:
            given[name] = getattr(args, name)
            source[name] = why[name] = flag_prefix + "--" + name.replace("_", "-")
        elif site is not None and name in site.model_fields_set:
            given[name] = getattr(site, name)
            source[name] = why[name] = f"{site_label}.{name}"
    if "tensor_parallel_size" not in given:
        if tp_default is None and os.environ.get(TP_ENV, "").strip():
            tp_default = (os.environ[TP_ENV].strip(), f"${TP_ENV}", TP_ENV_WHY)
        if tp_default is not None:
            given["tensor_parallel_size"], source["tensor_parallel_size"], \
                why["tensor_parallel_size"] = tp_default
    try:
        return EngineOptions(**given)  # type: ignore[arg-type]
    except PydanticError as exc:
        err = exc.errors()[0]
        msg = err["msg"].removeprefix("Value error, ")
        if err["loc"]:
            raise ValidationError(msg, field=source.get(str(err["loc"][0]))) from None
        # a check across fields (parallelism > 1 on the reference engine): say where each
        # of them came from, e.g. a --gres=gpu:N the admin did not mean as parallelism
        origins = [f"{n} {given[n]} from {why[n]}" for n in
                   ("engine", "tensor_parallel_size", "pipeline_parallel_size") if n in why]
        if "engine" not in why:
            origins.insert(0, "engine reference by default")
        raise ValidationError(f"{msg}; {'; '.join(origins)}") from None


def _site(args: argparse.Namespace) -> tuple[ParticipantConfig | None, str]:
    """The participant entry of --config (or $GONKA_NETWORK_CONFIG) that the key's identity
    names, and where it is; (None, "") without a config."""
    from ..config import load_config
    from ..identity import Identity

    path = args.config or (Path(os.environ[CONFIG_ENV]) if os.environ.get(CONFIG_ENV) else None)
    if path is None:
        return None, ""
    cfg, _ = load_config(path)
    name = Identity.load(args.key).name
    for i, p in enumerate(cfg.participants):
        if p.name == name:
            return p, f"{path}: participants.{i}"
    from_env = "" if args.config else f" (${CONFIG_ENV})"
    raise GonkaError(f"--key {args.key}: its identity '{name}' is not a participant of "
                     f"{path}{from_env}; participants: "
                     f"{', '.join(p.name for p in cfg.participants)}")


def _cmd_node(args: argparse.Namespace) -> int:
    from ..identity import Identity
    from ..inbox import post
    from ..node import EXIT_PREEMPTED, Preempted, StopSignal, pending_shards, run_node
    from ..spool import Spool

    options = _engine_options(args, *_site(args))  # bad settings fail before anything else
    stop = StopSignal()
    stop.install()  # before the engine loads: a signal now still means "stop cleanly"
    identity = Identity.load(args.key)
    for flag, path in (("--spool", args.spool), ("--inbox", args.inbox)):
        if not Path(path).is_dir():  # a typo must not look like a node with nothing to do,
            raise GonkaError(f"{flag} {path}: not a directory")  # nor fail after the work
    spool = Spool(args.spool)
    if not pending_shards(spool):
        print(f"{identity.name}: no pending shards in {args.spool}")
        return 0
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from ..engines.loader import load_engine

    ks = {spool.load(p).k for p in pending_shards(spool)}
    if len(ks) != 1:
        raise GonkaError(f"{args.spool}: pending shards ask for different top-k sizes {ks}")
    engine = load_engine(args.model, data_dir=args.data_dir, k=ks.pop(),
                         cheat_with=args.cheat_with, options=options)
    print(f"{identity.name}: engine {engine.name} ({engine.version})", file=sys.stderr)
    try:
        results = run_node(spool, identity, engine, lambda r: post(args.inbox, r),
                           batch_size=args.batch_size or engine.batch_hint, stop=stop)
    except Preempted as exc:
        print(f"{identity.name}: preempted: {exc}", file=sys.stderr)
        return EXIT_PREEMPTED
    print(f"{identity.name}: {len(results)} shard(s) done")
    return 0


def _innermost(parser: argparse.ArgumentParser,
               args: argparse.Namespace) -> argparse.ArgumentParser:
    """The (sub)parser of the command `args` chose, e.g. `gonka-hpc epoch status`'s."""
    while True:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        chosen = getattr(args, subs[0].dest, None) if subs else None
        if chosen is None:
            return parser
        parser = subs[0].choices[chosen]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["calibrate"]:  # its own parser, in verify/ (the top floor may import it)
        from verify.calibrate import main as calibrate

        with error_boundary():
            return calibrate(argv[1:], prog="gonka-hpc calibrate")
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # say it with the subcommand's usage, not the top level's
        _innermost(parser, args).error(f"unrecognized arguments: {' '.join(extra)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    with error_boundary():
        if args.command == "run":
            from .run import run_epoch

            return run_epoch(args)
        if args.command == "model":
            return _cmd_model(args)
        if args.command == "node":
            return _cmd_node(args)
        if args.command == "audit":
            return _cmd_audit(args)
        if args.command == "epoch":
            from .epoch import run_command

            return run_command(args)
    raise AssertionError(args.command)


def entrypoint() -> None:
    raise SystemExit(main())


if __name__ == "__main__":
    entrypoint()
