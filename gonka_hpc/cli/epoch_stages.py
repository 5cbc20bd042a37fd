"""`gonka-hpc epoch ...`: one epoch as a chain of Slurm jobs, and the stage bodies those jobs run.

`schedule` prepares an epoch dir (the job file's copy, keys, genesis, spools), renders one
batch script per stage (gonka_hpc.slurm_epoch) and submits them chained with `--dependency`.
`status` shows each stage's state; `cancel` stops them all. `stage NAME` is what a stage's
job runs; it reads everything from the epoch dir and the finalized chain, never from memory,
so each stage may run on another node of the cluster (the epoch dir is on shared storage).

The stages reuse the embedded pipeline's parts (gonka_hpc.cli.run): the same TA, ML nodes,
verifier and settlement, with Slurm instead of local processes.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, NoReturn

from ledger.audit import audit_chain, compare_dirs
from ledger.chain import find_records, head, read_chain

from .. import inbox
from ..config import (
    NetworkConfig,
    data_dir,
    default_config_path,
    genesis,
    load_config,
    thresholds_path,
)
from ..errors import GonkaError
from ..fileutil import atomic_write_text
from ..identity import Identity, load_or_create
from ..jobfile import read_job_file
from ..model import ensure_model
from ..records import EpochClose, ParticipantJoined, sign_record
from ..slurm_epoch import (
    TEARDOWN,
    EpochLayout,
    SlurmSettings,
    gres_gpus,
    job_ended,
    load_jobs,
    node_arg_words,
    render_scripts,
    stage_status,
    submit_epoch,
)
from ..spool import Spool
from ..transfer_agent import JobPlan, TransferAgent, authorize_escrow
from .run import (
    TIMEOUT_SCALE,
    Validators,
    _max_model_len,
    _summary,
    check_funded,
    ledger_bodies,
    render_summary,
    resolve_disputes,
    verify_batches,
)

REPO_SLURM = Path(__file__).resolve().parents[2] / "slurm"
EPOCH_FILE = "epoch.json"
PLAN_FILE = "plan.json"

# --- schedule, status ----------------------------------------------------------------------


def schedule(args: argparse.Namespace) -> int:
    settings = SlurmSettings(partition=args.partition, account=args.account,
                             node_partition=args.node_partition, node_qos=args.node_qos,
                             node_tasks=args.nodes, node_gres=args.node_gres,
                             node_cpus=args.node_cpus, node_time=args.node_time,
                             verify_tasks=args.verifiers, node_args=args.node_args)
    lay = prepare(args.dir, args.jobfile, args.config, args.client, settings)
    scripts = render_scripts(lay, settings)
    if args.dry_run:
        sdir = lay.dir / "sbatch"
        sdir.mkdir(exist_ok=True)
        for stage, text in scripts.items():
            (sdir / f"{stage}.sbatch").write_text(text)
            print(f"{stage:<11} {sdir / f'{stage}.sbatch'}")
        print(f"dry run: nothing submitted; the scripts above are what would be. To submit, "
              f"run the same command without --dry-run on a new --dir (or remove "
              f"{shlex.quote(str(lay.dir))} first: it holds this dry run's keys and genesis)")
        return 0
    jobs = submit_epoch(lay, scripts)
    for stage, jid in jobs.items():
        print(f"{stage:<11} {jid}")
    print(f"epoch dir   {lay.dir}\nstatus:     gonka-hpc epoch status --dir "
          f"{shlex.quote(str(lay.dir))}")
    return 0


def prepare(epoch_dir: Path, jobfile: Path, config: Path | None, client: str | None,
            settings: SlurmSettings) -> EpochLayout:
    """Check the inputs, then lay out the epoch dir: the job file's copy, keys, genesis."""
    cfg, cfg_path = load_config(config or default_config_path())
    net = cfg.network
    client = client or cfg.clients[0].name
    if client not in {c.name for c in cfg.clients}:
        raise GonkaError(f"--client '{client}' is not a client of this network")
    thresholds_path(cfg, cfg_path)  # checked now, not by a stage hours later
    check_node_settings(cfg, cfg_path, settings)
    if settings.validators != cfg.validators:
        settings = SlurmSettings(**{**asdict(settings), "validators": cfg.validators})
    job = read_job_file(jobfile, model=net.model, max_tokens_limit=net.max_tokens_limit)
    if epoch_dir.exists() and (not epoch_dir.is_dir() or any(epoch_dir.iterdir())):
        raise GonkaError(f"{epoch_dir}: exists and is not an empty directory; one epoch a dir")
    for err in job.errors:  # before any GPU time is queued, as `run` says them
        print(f"bad line answered with an error: {err.describe(str(jobfile))}",
              file=sys.stderr)
    d = epoch_dir.resolve()
    d.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("GONKA_HOME", str(data_dir()))
    info = ensure_model(net.model, progress=False)  # built once here, not by every node
    shutil.copyfile(jobfile, d / "job.jsonl")
    names = [p.name for p in cfg.participants] + [c.name for c in cfg.clients] \
        + cfg.validator_names()
    ids = {n: load_or_create(d / "keys" / f"{n}.key", n) for n in names}
    atomic_write_text(d / "genesis.json", json.dumps(
        genesis(cfg, {n: i.public_hex for n, i in ids.items()}), indent=1))
    for p in cfg.participants:
        Spool(d / "spool" / p.name).inbox.mkdir(parents=True, exist_ok=True)
    for sub in ("inbox", "logs", "outputs", "verification"):
        (d / sub).mkdir(exist_ok=True)
    atomic_write_text(d / EPOCH_FILE, json.dumps({
        "config": str(cfg_path.resolve()), "client": client, "jobfile": str(jobfile),
        "model": net.model, "model_hash": info.content_hash, "epoch": net.epoch,
        "settings": asdict(settings)}, indent=1))
    return EpochLayout(d, REPO_SLURM, Path(sys.executable), Path(os.environ["GONKA_HOME"]),
                       net.model, net.epoch, cfg_path.resolve())


def check_node_settings(cfg: NetworkConfig, cfg_path: Path, settings: SlurmSettings) -> None:
    """Parse the ML nodes' flags (GONKA_NODE_ARGS, split as slurm/gonka_node.sh splits them)
    with the node's own parser and validate every participant's engine settings as its node
    will, with the tensor parallelism --node-gres gives it: a typo fails now, not when the
    nodes stage starts hours later."""
    from .main import TP_ENV, TP_ENV_WHY, _engine_options, node_parser

    def bad(msg: str) -> GonkaError:
        return GonkaError(f"--node-args {settings.node_args!r}: {msg}")

    try:
        words = node_arg_words(settings)
    except ValueError as exc:  # what slurm/gonka_node.sh would refuse too
        raise bad(f"does not split into words: {exc}") from None
    if {"-h", "--help"} & set(words):
        raise bad("--help is not a node setting; see `gonka-hpc node --help`")
    parser = node_parser()

    def error(message: str) -> NoReturn:  # argparse's would print usage and exit
        raise bad(message)

    parser.error = error  # type: ignore[method-assign]
    fixed = {"spool": "<spool>", "key": "<key>", "inbox": "<inbox>", "model": cfg.network.model}
    args, extra = parser.parse_known_args(
        [x for k, v in fixed.items() for x in (f"--{k}", v)] + words)
    if extra:
        raise bad(f"unrecognized arguments: {' '.join(extra)}")
    for name, value in fixed.items():
        if str(getattr(args, name)) != value:
            raise bad(f"--{name} is set by slurm/gonka_node.sh for each spool; leave it out")
    if args.config is not None:
        raise bad("--config: the nodes read the epoch's network config (--config here)")
    gpus = gres_gpus(settings.node_gres)
    tp = None
    if os.environ.get(TP_ENV, "").strip():  # set here, sbatch passes it on to the nodes
        tp = (os.environ[TP_ENV].strip(), f"${TP_ENV}",
              f"{TP_ENV_WHY} unless it is set already, as it is in this shell")
    elif gpus:
        tp = (str(gpus), f"--node-gres {settings.node_gres}", f"--node-gres "
              f"{settings.node_gres}, which slurm/gonka_node.sh turns into ${TP_ENV}")
    for i, p in enumerate(cfg.participants):
        try:
            opts = _engine_options(args, p, f"{cfg_path}: participants.{i}",
                                   flag_prefix="--node-args ", tp_default=tp)
        except GonkaError as exc:
            raise GonkaError(f"participant {p.name}'s ML node would refuse its settings: "
                             f"{exc}") from None
        if gpus and opts.tensor_parallel_size > gpus:
            raise GonkaError(f"participant {p.name}: tensor_parallel_size "
                             f"{opts.tensor_parallel_size} is more than the {gpus} GPU(s) "
                             f"--node-gres {settings.node_gres} gives each ML-node task")


def status(epoch_dir: Path, *, as_json: bool = False) -> int:
    """Print each stage's state; exit 0 when settled, 1 while running, 2 when failed."""
    stages = stage_status(epoch_dir, load_jobs(epoch_dir))
    failed = any(s.state in ("FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL")
                 or (s.state == "CANCELLED" and s.stage != TEARDOWN) for s in stages)
    settled = all(s.state == "COMPLETED" for s in stages if s.stage != TEARDOWN)
    if as_json:
        print(json.dumps([s.to_dict() for s in stages], indent=1))
    else:
        print(f"{'stage':<11} {'job':<9} {'state':<10} why")
        for s in stages:
            print(f"{s.stage:<11} {s.job_id:<9} {s.state:<10} {s.why}".rstrip())
        summary = epoch_dir / "summary.json"
        if settled and summary.exists():
            print(render_summary(json.loads(summary.read_text())))
    return 2 if failed else 0 if settled else 1


# --- the stage bodies ----------------------------------------------------------------------


class _Epoch:
    """An epoch dir as the stages read it."""

    def __init__(self, d: Path) -> None:
        if not (d / EPOCH_FILE).exists():
            raise GonkaError(f"{d}: not an epoch dir (no {EPOCH_FILE}); make one with "
                             "`gonka-hpc epoch schedule`")
        self.dir = d.resolve()
        self.meta = json.loads((d / EPOCH_FILE).read_text())
        cfg, self.cfg_path = load_config(Path(self.meta["config"]))
        self.cfg: NetworkConfig = cfg
        names = [p.name for p in cfg.participants] + [c.name for c in cfg.clients] \
            + cfg.validator_names()
        self.ids = {n: Identity.load(self.dir / "keys" / f"{n}.key") for n in names
                    if (self.dir / "keys" / f"{n}.key").exists()}
        self.participants = {p.name: p.weight for p in cfg.participants}
        self.vals = Validators(None, self.dir / "logs", self.dir / "ledger", self.dir / "inbox",
                               cfg.validator_names())
        self.spools = {n: Spool(self.dir / "spool" / n) for n in self.participants}

    def post(self, record: Any) -> str:
        return inbox.post(self.vals.inbox, record)

    def ta(self) -> TransferAgent:
        from transformers import PreTrainedTokenizerFast

        net = self.cfg.network
        info = ensure_model(net.model, progress=False)
        tok = PreTrainedTokenizerFast.from_pretrained(str(info.path))
        return TransferAgent(self.ids[self.cfg.ta], epoch=net.epoch, model=net.model,
                             model_hash=info.content_hash, k=net.top_k_logprobs,
                             price_per_token=net.price_per_token, tokenizer=tok,
                             max_model_len=_max_model_len(info.path), spools=self.spools,
                             post=self.post)

    def job(self, ta: TransferAgent) -> Any:
        net = self.cfg.network
        return ta.admit(read_job_file(self.dir / "job.jsonl", model=net.model,
                                      max_tokens_limit=net.max_tokens_limit))

    def plan(self, ta: TransferAgent) -> tuple[JobPlan, dict[str, Any]]:
        path = self.dir / PLAN_FILE
        if not path.exists():
            raise GonkaError(f"{path}: missing; the assign stage did not finish")
        meta = json.loads(path.read_text())
        shards = {e: self.spools[e].load(self.spools[e].inbox / f"{sid}.json")
                  for e, sid in meta["shards"].items()}
        return JobPlan(meta["job_id"], meta["client"], self.job(ta), meta["escrow"],
                       shards), meta

    def wait_chain(self, timeout: float = 300) -> None:
        """Until validator-0's chain exists: the validators job may still be starting."""
        deadline = time.monotonic() + timeout * TIMEOUT_SCALE
        jobs = json.loads((self.dir / "jobs.json").read_text()) \
            if (self.dir / "jobs.json").exists() else {}
        while not (self.vals.chain0 / "chain.log").exists():
            ended = job_ended(jobs["validators"]) if "validators" in jobs else None
            if ended:
                raise GonkaError(f"the validators job {jobs['validators']} ended ({ended}) "
                                 f"before its chain existed; see its log in {self.dir / 'logs'}")
            if time.monotonic() > deadline:
                raise GonkaError(f"no chain at {self.vals.chain0} after {timeout:.0f}s: are the "
                                 "validators running? see `gonka-hpc epoch status`")
            time.sleep(0.2)


def _say(msg: str) -> None:
    print(msg, flush=True)


def stage_assign(args: argparse.Namespace) -> int:
    ep = _Epoch(args.dir)
    net = ep.cfg.network
    if (ep.dir / PLAN_FILE).exists():  # a rerun (requeue after a node failure): done already
        _say(f"already assigned: {ep.dir / PLAN_FILE}")
        return 0
    ep.wait_chain()
    joined = {r["body"]["participant"] for s in read_chain(ep.vals.chain0)
              for r in s.block.records if r["kind"] == "participant_joined"}
    joins = [ep.post(sign_record(ep.ids[n], ParticipantJoined(n, ep.ids[n].public_hex, w)))
             for n, w in ep.participants.items() if n not in joined]
    ep.vals.wait_final(joins, "participants joining")
    _, block_hash = head(ep.vals.chain0)
    ta = ep.ta()
    job = ep.job(ta)
    client = ep.meta["client"]
    job_id, escrow, sig = authorize_escrow(ep.ids[client], job, ta=ep.cfg.ta, epoch=net.epoch,
                                           price_per_token=net.price_per_token)
    check_funded(ep.cfg, client, job, escrow)
    plan = ta.accept(job, client=client, job_id=job_id, escrow=escrow, client_signature=sig,
                     block_hash=block_hash, weights=ep.participants)
    atomic_write_text(ep.dir / PLAN_FILE, json.dumps({
        "job_id": job_id, "client": client, "escrow": escrow, "block_hash": block_hash,
        "shards": {e: s.shard_id for e, s in plan.shards.items()},
        "records": [r.record_id for r in plan.records]}, indent=1))
    _say(f"{job_id}: {len(job.requests)} requests ({len(job.errors)} bad lines) escrowed "
         f"({escrow} units), assigned from block {block_hash[:16]}: "
         + ", ".join(f"{e}: {len(s.requests)}" for e, s in plan.shards.items()))
    return 0


def stage_finalize(args: argparse.Namespace) -> int:
    ep = _Epoch(args.dir)
    ta = ep.ta()
    plan, meta = ep.plan(ta)
    commits = []
    for e, s in plan.shards.items():
        done = ep.spools[e].done_path(s.shard_id)
        if not done.exists():
            raise GonkaError(f"shard {s.shard_id} of {e} is not done ({done} missing): did "
                             "the nodes stage really finish? see its logs")
        commits.append(json.loads(done.read_text())["record_id"])
    ep.vals.wait_final(meta["records"] + commits, "job, assignments and artifact commits",
                       timeout=300)
    out = ep.dir / "outputs" / "job.output.jsonl"
    delivered = ta.deliver(plan, out)
    ep.vals.wait_final([delivered.record_id], "output delivery")
    _say(f"{len(commits)} artifact batches final; outputs -> {out}")
    return 0


def stage_verify(args: argparse.Namespace) -> int:
    ep = _Epoch(args.dir)
    task = args.task if args.task is not None else int(os.environ.get("SLURM_ARRAY_TASK_ID", 0))
    tasks = args.tasks or int(os.environ.get("SLURM_ARRAY_TASK_COUNT", 1))
    if not 0 <= task < tasks:
        raise GonkaError(f"--task {task} is outside 0..{tasks - 1}")
    from verify.thresholds import load_thresholds

    net = ep.cfg.network
    meta = json.loads((ep.dir / PLAN_FILE).read_text())
    th = load_thresholds(thresholds_path(ep.cfg, ep.cfg_path))
    verdicts = verify_batches(ep.dir, ep.vals, ep.ids, meta["job_id"], net.model,
                              net.top_k_logprobs, th, net.epoch, quiet=True,
                              share=(task, tasks))
    ep.vals.wait_final(verdicts, "verdicts", timeout=300)
    _say(f"task {task}/{tasks}: {len(verdicts)} batch(es) verified, verdicts final")
    return 0


def stage_settle(args: argparse.Namespace) -> int:
    ep = _Epoch(args.dir)
    meta = json.loads((ep.dir / PLAN_FILE).read_text())
    committed = {k for k in ledger_bodies(ep.vals.chain0, "artifact_batch_committed")
                 if k[0] == meta["job_id"]}
    judged = {k for k in ledger_bodies(ep.vals.chain0, "verdict") if k[0] == meta["job_id"]}
    if committed - judged:
        raise GonkaError(f"{len(committed - judged)} committed batch(es) have no final "
                         f"verdict: {sorted(committed - judged)[:3]}")
    # each failing verdict opened a dispute: its panel (drawn from the verdict's block)
    # re-checks the batch and votes before the epoch closes
    from verify.thresholds import load_thresholds

    net = ep.cfg.network
    th = load_thresholds(thresholds_path(ep.cfg, ep.cfg_path))
    votes = resolve_disputes(ep.dir, ep.vals, ep.ids, meta["job_id"], net.model,
                             net.top_k_logprobs, th, net.epoch, quiet=True)
    if votes:
        ep.vals.wait_final(votes, "dispute votes", timeout=300)
    close = ep.post(sign_record(ep.ids[ep.vals.names[0]], EpochClose(net.epoch)))
    ep.vals.wait_final([close], "epoch close")
    (ep.vals.inbox / "STOP").touch()
    dirs = [ep.vals.data / n for n in ep.vals.names]
    _wait_same_chains(dirs, close)
    for d in dirs:
        audit_chain(d)
    ta = ep.ta()
    plan, _ = ep.plan(ta)
    summary = _summary(ep.vals.state(), plan, plan.job, ep.dir,
                       ep.dir / "outputs" / "job.output.jsonl", dirs)
    summary["wall_seconds"] = round(time.time() - (ep.dir / EPOCH_FILE).stat().st_mtime, 1)
    atomic_write_text(ep.dir / "summary.json", json.dumps(summary, indent=1))
    print(render_summary(summary))
    return 0


def _wait_same_chains(dirs: list[Path], close: str, timeout: float = 120) -> None:
    """Until every validator's chain holds the close and all are identical."""
    deadline = time.monotonic() + timeout * TIMEOUT_SCALE
    while True:
        if all((d / "chain.log").exists() and find_records(d, {close}) for d in dirs):
            mismatch = compare_dirs(dirs)
            if not mismatch:
                return
        if time.monotonic() > deadline:
            raise GonkaError(f"validator chains not identical after {timeout:.0f}s")
        time.sleep(0.2)


def stage_teardown(args: argparse.Namespace) -> int:
    """Runs only when a stage failed: stop the validators, say which stage failed."""
    ep = _Epoch(args.dir)
    (ep.vals.inbox / "STOP").touch()
    jobs = json.loads((ep.dir / "jobs.json").read_text()) if (ep.dir / "jobs.json").exists() \
        else {}
    bad = [f"{s.stage} ({s.state})" for s in stage_status(ep.dir, jobs)
           if s.stage != TEARDOWN and s.state not in ("COMPLETED", "RUNNING", "PENDING")]
    _say(f"a stage failed ({', '.join(bad) or 'see `gonka-hpc epoch status`'}); "
         "stopped the validators (INBOX/STOP)")
    return 0


STAGE_BODIES = {"assign": stage_assign, "finalize": stage_finalize, "verify": stage_verify,
                "settle": stage_settle, TEARDOWN: stage_teardown}
