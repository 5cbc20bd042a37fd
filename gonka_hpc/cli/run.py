"""`gonka-hpc run JOBFILE`: one whole epoch on one machine, with real parts.

Validators run as one MPI job (`mpiexec -n N python -m ledger run`), each ML node as its own
process (`gonka-hpc node`), and records travel through the validators' signed inbox, exactly
as on a cluster; only Slurm is missing. Stages:

  keys + genesis -> validators -> participants join -> client escrow, TA assigns
  -> ML nodes generate + commit artifacts -> TA delivers outputs -> verifiers re-score
  -> each failing verdict's dispute panel re-checks and votes -> epoch close settles
  -> chains audited -> summary

Everything lands under one output dir that the run names at the start.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ledger.audit import audit_chain, compare_dirs
from ledger.block import genesis_hash
from ledger.chain import find_records, head, read_chain
from ledger.state import EpochState, replay
from verify.dispute import recheck
from verify.thresholds import load_thresholds
from verify.verifier import verify_batch

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
from ..records import EpochClose, ParticipantJoined, SignedRecord, sign_record
from ..slurm_epoch import CONFIG_ENV
from ..spool import Spool
from ..transfer_agent import TransferAgent, authorize_escrow

CHEAT_MODEL = "gonka-tiny-small"
TIMEOUT_SCALE = float(os.environ.get("GONKA_TIMEOUT_SCALE", "1"))


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except FileNotFoundError:
        return "(no log)"


class _StageClock:
    """Wall time per pipeline stage, for the summary and the benchmark."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._t = time.monotonic()

    def lap(self, name: str) -> None:
        now = time.monotonic()
        self.laps[name] = round(now - self._t, 3)
        self._t = now


@dataclass
class Validators:
    """The MPI validator job and where to read its finalized chain."""

    proc: subprocess.Popen[bytes] | None
    """None when the validators run elsewhere (a Slurm job): only the chain is watched."""
    log: Path
    data: Path
    inbox: Path
    names: list[str]

    @property
    def chain0(self) -> Path:
        return self.data / self.names[0]

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise GonkaError(f"validators exited with code {self.proc.returncode}; "
                             f"last lines of {self.log}:\n{_tail(self.log)}")

    def wait_final(self, record_ids: Iterable[str], what: str, timeout: float = 120) -> None:
        """Poll until every record is in a finalized block (or fail, naming why)."""
        wanted = set(record_ids)
        deadline = time.monotonic() + timeout * TIMEOUT_SCALE
        while True:
            found = find_records(self.chain0, wanted) if (self.chain0 / "chain.log").exists() \
                else {}
            if len(found) == len(wanted):
                return
            self.check_alive()
            rejected = [p for p in (self.inbox / "rejected").glob("*.reason")
                        if p.stem in wanted] if (self.inbox / "rejected").is_dir() else []
            if rejected:
                raise GonkaError(f"{what}: validators rejected record {rejected[0].stem[:16]}: "
                                 f"{rejected[0].read_text().strip()}")
            if time.monotonic() > deadline:
                raise GonkaError(f"{what}: {len(wanted) - len(found)} record(s) not final "
                                 f"after {timeout:.0f}s; see {self.log}")
            time.sleep(0.05)

    def state(self, head_known: bool = False) -> EpochState:
        """The state replayed from validator 0's chain. `head_known`: also begin the next
        block, so the head's hash is known (verdicts name the block holding a commit). The
        hash comes from the same read of the chain: a block landing between two reads would
        otherwise be taken for the head."""
        genesis_doc = json.loads((self.chain0 / "genesis.json").read_text())
        blocks = read_chain(self.chain0)
        state = replay(genesis_doc, [s.block for s in blocks])
        if head_known:
            state.begin_block(state.height + 1,
                              blocks[-1].hash if blocks else genesis_hash(genesis_doc))
        return state

    def stop(self, timeout: float = 60) -> None:
        (self.inbox / "STOP").touch()
        if self.proc is None:
            return
        try:
            rc = self.proc.wait(timeout=timeout * TIMEOUT_SCALE)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise GonkaError(f"validators did not stop; see {self.log}") from None
        if rc != 0:
            raise GonkaError(f"validators exited with code {rc}; last lines of {self.log}:\n"
                             f"{_tail(self.log)}")


def _out_dir(arg: Path | None) -> Path:
    if arg is None:
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        arg = Path("runs") / stamp
    try:
        if arg.exists() and not arg.is_dir():
            raise GonkaError(f"{arg}: exists and is not a directory; pick another --out")
        if arg.exists() and any(arg.iterdir()):
            raise GonkaError(f"{arg}: output dir exists and is not empty; pick another with "
                             "--out")
        arg.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a path through a file, no permission, a read-only fs, ...
        raise GonkaError(f"{arg}: cannot create the output dir: {exc.strerror or exc}; pick "
                         "another with --out") from None
    return arg


def start_validators(out: Path, n: int, genesis_path: Path, keys: Path) -> Validators:
    from mpi4py import MPI  # noqa: F401  (fails early, clearly, if mpi4py is missing)

    mpiexec = Path(sys.executable).parent / "mpiexec"
    launcher = str(mpiexec) if mpiexec.exists() else "mpiexec"
    data, box = out / "ledger", out / "inbox"
    box.mkdir(parents=True, exist_ok=True)
    log = out / "logs" / "validators.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [launcher, "-n", str(n), sys.executable, "-m", "ledger", "run", "--genesis",
           str(genesis_path), "--keys", str(keys), "--data", str(data), "--inbox", str(box),
           "--interval", "0.05"]
    with open(log, "ab") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return Validators(proc, log, data, box, [f"validator-{i}" for i in range(n)])


def _node_cmd(out: Path, name: str, model: str, cheat: bool,
              engine_args: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "gonka_hpc.cli.main", "node", "--spool",
           str(out / "spool" / name), "--key", str(out / "keys" / f"{name}.key"), "--inbox",
           str(out / "inbox"), "--model", model, "--threads", "1", *engine_args]
    return cmd + (["--cheat-with", CHEAT_MODEL] if cheat else [])


def run_nodes(out: Path, shards: dict[str, Any], model: str, cheater: str | None,
              quiet: bool, engines: dict[str, list[str]]) -> None:
    """One ML-node process per executor with work; progress from the spools."""
    procs: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
    # each node's engine settings are its flags: a network config exported in this shell
    # (the nodes stage's variable) must not add another participant entry's
    env = {k: v for k, v in os.environ.items() if k != CONFIG_ENV}
    for name in sorted(shards):
        log = out / "logs" / f"node-{name}.log"
        with open(log, "ab") as fh:
            procs[name] = (subprocess.Popen(_node_cmd(out, name, model, name == cheater,
                                                      engines[name]), env=env,
                                            stdout=fh, stderr=subprocess.STDOUT), log)
    total = sum(len(s.requests) for s in shards.values())
    bar = tqdm(total=total, desc="inference", unit="req", disable=quiet, file=sys.stderr,
               mininterval=0.1 if sys.stderr.isatty() else 10)
    try:
        while True:
            done = sum(Spool(out / "spool" / n).progress(s.shard_id) for n, s in shards.items())
            bar.update(done - bar.n)
            if all(p.poll() is not None for p, _ in procs.values()):
                break
            time.sleep(0.2)
    finally:
        bar.close()
        for p, _ in procs.values():  # interrupted: leave no orphan ML node behind
            if p.poll() is None:
                p.terminate()
                p.wait()
    for name, (p, log) in procs.items():
        if p.returncode != 0:
            raise GonkaError(f"ML node {name} exited with code {p.returncode}; last lines of "
                             f"{log}:\n{_tail(log)}")


def run_epoch(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    cfg, cfg_path = load_config(args.config or default_config_path())
    net = cfg.network
    participants = {p.name: p.weight for p in cfg.participants}
    if args.cheater is not None:
        if args.cheater not in participants:
            raise GonkaError(f"--cheater '{args.cheater}' is not a participant; "
                             f"participants: {', '.join(participants)}")
        if args.cheater == cfg.ta:
            raise GonkaError(f"--cheater '{args.cheater}' runs the TA and never executes its "
                             "own jobs; pick another participant")
    client_name = args.client or cfg.clients[0].name
    if client_name not in {c.name for c in cfg.clients}:
        raise GonkaError(f"--client '{client_name}' is not a client of this network")
    thresholds = load_thresholds(thresholds_path(cfg, cfg_path))
    job = read_job_file(args.jobfile, model=net.model, max_tokens_limit=net.max_tokens_limit)
    out = _out_dir(args.out)
    _say(f"gonka-hpc: epoch {net.epoch} of '{net.name}' -> {out}")

    # --- model and identities ---
    os.environ.setdefault("GONKA_HOME", str(data_dir()))
    info = ensure_model(net.model, progress=not args.quiet)
    if args.cheater:
        ensure_model(CHEAT_MODEL, progress=not args.quiet)
    _say(f"model {info.name} {info.content_hash[:16]}")
    keys = out / "keys"
    names = list(participants) + [c.name for c in cfg.clients] + cfg.validator_names()
    ids: dict[str, Identity] = {n: load_or_create(keys / f"{n}.key", n) for n in names}
    genesis_path = out / "genesis.json"
    atomic_write_text(genesis_path, json.dumps(
        genesis(cfg, {n: i.public_hex for n, i in ids.items()}), indent=1))

    vals = start_validators(out, cfg.validators, genesis_path, keys)
    try:
        summary = _epoch(args, cfg, cfg_path, out, ids, participants, client_name, job, info,
                         thresholds, vals)
    except BaseException:
        if vals.proc.poll() is None:
            vals.proc.terminate()
            try:
                vals.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                vals.proc.kill()
        raise
    summary["wall_seconds"] = round(time.monotonic() - t0, 1)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
    print(render_summary(summary))
    return 0


def check_funded(cfg: NetworkConfig, client: str, job: Any, escrow: int) -> None:
    """Refuse a job its client cannot pay for now, not after the inference: the ledger would
    keep the acceptance pending (funds may still arrive) and the epoch would time out."""
    balance = next(c.balance for c in cfg.clients if c.name == client)
    if escrow > balance:
        price = cfg.network.price_per_token
        raise GonkaError(
            f"client '{client}' cannot fund this job: its escrow is {escrow} units (the "
            f"{sum(r.max_tokens for r in job.requests)} max tokens of its "
            f"{len(job.requests)} request(s) x price {price}) and its balance is {balance}; "
            "lower max_tokens or "
            "fund the client in the config")


def _epoch(args: argparse.Namespace, cfg: NetworkConfig, cfg_path: Path, out: Path,
           ids: dict[str, Identity], participants: dict[str, int], client_name: str,
           job: Any, info: Any, thresholds: Any, vals: Validators) -> dict[str, Any]:
    net = cfg.network

    def post(record: SignedRecord) -> str:
        return inbox.post(vals.inbox, record)

    joins = [post(sign_record(ids[n], ParticipantJoined(n, ids[n].public_hex, w)))
             for n, w in participants.items()]
    clock = _StageClock()
    vals.wait_final(joins, "participants joining")
    clock.lap("join")
    _, block_hash = head(vals.chain0)
    _say(f"{len(joins)} participants joined; assigning from block {block_hash[:16]}")

    # --- client and transfer agent ---
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(info.path))
    spools = {n: Spool(out / "spool" / n) for n in participants}
    ta = TransferAgent(ids[cfg.ta], epoch=net.epoch, model=net.model,
                       model_hash=info.content_hash, k=net.top_k_logprobs,
                       price_per_token=net.price_per_token, tokenizer=tokenizer,
                       max_model_len=_max_model_len(info.path), spools=spools, post=post)
    job = ta.admit(job)
    for err in job.errors:
        _say(f"  bad line answered with an error: {err.describe(str(args.jobfile))}")
    if not job.requests:  # e.g. every prompt too long for the model: nothing to escrow or run
        raise GonkaError(f"{args.jobfile}: no request fits the model (every line is answered "
                         "with an error above); nothing to run")
    job_id, escrow, sig = authorize_escrow(ids[client_name], job, ta=cfg.ta, epoch=net.epoch,
                                           price_per_token=net.price_per_token)
    check_funded(cfg, client_name, job, escrow)
    plan = ta.accept(job, client=client_name, job_id=job_id, escrow=escrow,
                     client_signature=sig, block_hash=block_hash, weights=participants)
    _say(f"{job_id}: {len(job.requests)} requests escrowed ({escrow} units), "
         + ", ".join(f"{e}: {len(s.requests)}" for e, s in plan.shards.items()))

    # --- ML nodes (the ledger finalizes acceptance and assignment meanwhile) ---
    clock.lap("admit_and_assign")
    run_nodes(out, plan.shards, net.model, args.cheater, args.quiet,
              {p.name: p.engine_options().node_args() for p in cfg.participants})
    clock.lap("inference")
    commits = {e: json.loads(spools[e].done_path(s.shard_id).read_text())["record_id"]
               for e, s in plan.shards.items()}
    vals.wait_final([r.record_id for r in plan.records] + list(commits.values()),
                    "job, assignments and artifact commits")

    # --- delivery ---
    output_path = out / "outputs" / f"{Path(args.jobfile).stem}.output.jsonl"
    clock.lap("commit_final")
    delivered = ta.deliver(plan, output_path)
    _say(f"outputs -> {output_path}")

    # --- verification: each batch by the verifier its commit block assigns ---
    verdicts = verify_batches(out, vals, ids, plan.job_id, net.model, net.top_k_logprobs,
                              thresholds, net.epoch, args.quiet)
    vals.wait_final(verdicts + [delivered.record_id], "verdicts")
    clock.lap("verification")

    # --- disputes: the panel drawn from each failing verdict's block re-checks and votes ---
    votes = resolve_disputes(out, vals, ids, plan.job_id, net.model, net.top_k_logprobs,
                             thresholds, net.epoch, args.quiet)
    if votes:
        vals.wait_final(votes, "dispute votes")
    clock.lap("disputes")

    # --- settlement ---
    close = post(sign_record(ids[vals.names[0]], EpochClose(net.epoch)))
    vals.wait_final([close], "epoch close")
    vals.stop()
    dirs = [vals.data / n for n in vals.names]
    for d in dirs:
        audit_chain(d)
    mismatch = compare_dirs(dirs)
    if mismatch:
        raise GonkaError("validator chains differ: " + "; ".join(mismatch))
    clock.lap("settle_and_audit")
    summary = _summary(vals.state(), plan, job, out, output_path, dirs)
    summary["stage_seconds"] = clock.laps
    return summary


def ledger_bodies(chain_dir: Path, kind: str) -> dict[tuple[str, str], dict[str, Any]]:
    """Bodies of the finalized records of one kind, keyed by (job_id, shard_id)."""
    return {(r["body"]["job_id"], r["body"]["shard_id"]): r["body"]
            for s in read_chain(chain_dir) for r in s.block.records if r["kind"] == kind}


def verify_batches(out: Path, vals: Validators, ids: dict[str, Identity], job_id: str,
                   model: str, k: int, thresholds: Any, epoch: int, quiet: bool,
                   share: tuple[int, int] = (0, 1)) -> list[str]:
    """Every committed batch of the job, verified by its assigned verifier from what the
    ledger says (never from the TA's memory); returns the posted verdicts' record ids.
    `share` (i, n): only batches i, i+n, ... in sorted order (task i of a verifier array)."""
    state = vals.state(head_known=True)
    assigned = ledger_bodies(vals.chain0, "inference_assigned")
    committed = ledger_bodies(vals.chain0, "artifact_batch_committed")
    engine = _verifier_engine(model, k)
    verdicts = []
    keys = sorted(key for key in committed if key[0] == job_id)[share[0]::share[1]]
    bar = tqdm(total=len(keys), desc="verification", unit="batch", disable=quiet,
               file=sys.stderr, mininterval=0.1 if sys.stderr.isatty() else 10)
    for key in keys:
        a, c = assigned[key], committed[key]
        sample_block, verifier = state.verification_duty(*key)
        spool = Spool(out / "spool" / c["executor"])
        shard_path = spool.inbox / f"{c['shard_id']}.json"
        check = verify_batch(
            ids[verifier], engine, thresholds, artifact=spool.artifact_path(c["shard_id"]),
            shard=spool.load(shard_path), assigned=a, committed=c,
            executor_pubkey=state.pubkey(c["executor"]) or "",
            reputation=state.reputation(c["executor"]), block_hash=sample_block, epoch=epoch)
        atomic_write_text(out / "verification" / f"{c['shard_id']}.json", json.dumps({
            "verifier": verifier, "verdict": check.verdict.to_dict(),
            "binding_problems": check.binding_problems,
            "evidence": [e.summary() for e in check.evidence]}, indent=1))
        verdicts.append(inbox.post(vals.inbox, check.verdict))
        bar.update(1)
    bar.close()
    return verdicts


def resolve_disputes(out: Path, vals: Validators, ids: dict[str, Identity], job_id: str,
                     model: str, k: int, thresholds: Any, epoch: int,
                     quiet: bool) -> list[str]:
    """Every open dispute of the job re-checked by each member of its panel, as the ledger
    draws it from the block holding the failing verdict; returns the posted votes' ids.

    Each member re-runs `verify_batch` on the same sample (`verify.dispute.recheck`); its
    vote and evidence land in `disputes/<shard_id>.<member>.json`.
    """
    state = vals.state(head_known=True)  # the block holding the verdicts is known
    disputes = [d for d in state.disputes() if d.job_id == job_id and d.outcome == "open"]
    if not disputes:
        return []
    assigned = ledger_bodies(vals.chain0, "inference_assigned")
    committed = ledger_bodies(vals.chain0, "artifact_batch_committed")
    engine = _verifier_engine(model, k)
    work = [(d, m) for d in disputes for m in state.dispute_panel(d.job_id, d.shard_id)[1]]
    bar = tqdm(total=len(work), desc="disputes", unit="re-check", disable=quiet,
               file=sys.stderr, mininterval=0.1 if sys.stderr.isatty() else 10)
    votes = []
    for d, member in work:
        key = (d.job_id, d.shard_id)
        a, c = assigned[key], committed[key]
        spool = Spool(out / "spool" / c["executor"])
        check = recheck(
            ids[member], engine, thresholds, artifact=spool.artifact_path(c["shard_id"]),
            shard=spool.load(spool.inbox / f"{c['shard_id']}.json"), assigned=a, committed=c,
            executor_pubkey=state.pubkey(c["executor"]) or "",
            reputation=state.reputation(c["executor"]),
            sample_block=state.batch(*key).sample_block or "",
            dispute_block=d.dispute_block or "", epoch=epoch)
        atomic_write_text(out / "disputes" / f"{c['shard_id']}.{member}.json", json.dumps({
            "member": member, "vote": check.vote.to_dict(),
            "binding_problems": check.binding_problems,
            "evidence": [e.summary() for e in check.evidence]}, indent=1))
        votes.append(inbox.post(vals.inbox, check.vote))
        bar.update(1)
    bar.close()
    _say(f"{len(disputes)} dispute(s): {len(votes)} panel re-check(s) posted")
    return votes


def _max_model_len(model_dir: Path) -> int:
    return int(json.loads((model_dir / "config.json").read_text())["max_position_embeddings"])


def _verifier_engine(model: str, k: int) -> Any:
    from ..engines.loader import load_engine

    return load_engine(model, k=k)


def _summary(state: EpochState, plan: Any, job: Any, out: Path, output_path: Path,
             dirs: list[Path]) -> dict[str, Any]:
    settlement = state.settlement or {}
    verdicts = []
    for shard_file in sorted((out / "verification").glob("*.json")):
        v = json.loads(shard_file.read_text())
        body = v["verdict"]["body"]
        verdicts.append({"executor": body["executor"], "verifier": v["verifier"],
                         "checked": body["checked"], "failed": body["failed"],
                         "passed": body["passed"]})
    n_tokens = sum(b.n_tokens for b in state.batches())
    height, head_hash = head(dirs[0])
    return {
        "out_dir": str(out), "output_file": str(output_path), "job_id": plan.job_id,
        "requests": len(job.entries), "bad_lines": len(job.errors),
        "answered": len(job.requests), "tokens_generated": n_tokens,
        "inferences_verified": sum(v["checked"] for v in verdicts), "verdicts": verdicts,
        "rewards": settlement.get("rewards", {}), "refunds": settlement.get("refunds", {}),
        "forfeited": settlement.get("forfeited", []), "pool": settlement.get("pool"),
        "disputes": settlement.get("disputes", []),
        "overturned": settlement.get("overturned", []),
        "balances": state.balances(), "total_supply": state.total_supply(),
        "chain": {"height": height, "head": head_hash, "validators": len(dirs),
                  "identical": True},
    }


def render_summary(s: dict[str, Any]) -> str:
    lines = ["", "epoch summary", "-------------",
             (f"requests            {s['requests']} ({s['answered']} answered, "
              f"{s['bad_lines']} bad lines answered with errors)"),
             f"tokens generated    {s['tokens_generated']}",
             f"inferences verified {s['inferences_verified']}"]
    for v in s["verdicts"]:
        mark = "PASS" if v["passed"] else "FAIL"
        lines.append(f"  verdict {mark}  {v['executor']:<10} checked {v['checked']:>3}, "
                     f"failed {v['failed']:>3}  (verifier {v['verifier']})")
    for d in s["disputes"]:
        fails = sum(1 for p in d["votes"].values() if not p)
        lines.append(f"  dispute  {d['executor']:<10} verdict by {d['verifier']}: panel votes "
                     f"{fails}/{len(d['votes'])} fail -> {d['outcome'].upper()}")
    for name in s["overturned"]:
        lines.append(f"  OVERTURN {name:<10} its failing verdict was overturned by the panel")
    lines.append(f"paid to executors   {s['pool']} (work at the token price + subsidy share)")
    for name, amount in sorted(s["rewards"].items()):
        lines.append(f"  reward   {name:<10} {amount}")
    for name in s["forfeited"]:
        lines.append(f"  FORFEIT  {name:<10} caught cheating: whole epoch reward lost")
    for name, amount in sorted(s["refunds"].items()):
        lines.append(f"  refund   {name:<10} {amount}")
    c = s["chain"]
    lines += [(f"ledger              height {c['height']}, head {c['head'][:16]}, "
               f"{c['validators']} validator chains identical and verified"),
              f"outputs             {s['output_file']}",
              f"run dir             {s['out_dir']}  ({s.get('wall_seconds', '?')} s)"]
    return "\n".join(lines)
