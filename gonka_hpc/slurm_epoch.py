"""One epoch as a chain of Slurm jobs: render a batch script per stage, submit them chained with
`--dependency`, and read their states back from slurmctld (`scontrol`) and slurmdbd (`sacct`).

The stages, in order (each waits for the one before with `afterok`, and is cancelled by Slurm,
`--kill-on-invalid-dep=yes`, when that one fails):

  validators  the MPI validator job (slurm/gonka_validators.sh); runs until settle stops it
  assign      the client's escrow and the TA's assignment; shards land in each site's spool
  nodes       the ML-node array (slurm/gonka_node.sh): preemptible, requeued, resumed
  finalize    waits until every artifact commit is final; the TA delivers the output file
  verify      the verifier array (slurm/gonka_verify.sh): re-scores sampled inferences
  settle      closes the epoch, stops the validators, audits the chains, writes summary.json

plus `teardown`, which runs only if a stage fails (`afternotok` on any of them): it stops the
validators, so a failed epoch leaves nothing running. When every stage succeeds Slurm cancels
it as never needed.

Scripts carry no paths in `#SBATCH` lines (logs go to `logs/` under the epoch dir, the submit
dir), and every path in their body is shell-quoted, so an epoch dir may hold spaces and quotes.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import GonkaError

STAGES = ("validators", "assign", "nodes", "finalize", "verify", "settle")
TEARDOWN = "teardown"
ARRAY_STAGES = ("nodes", "verify")
JOBS_FILE = "jobs.json"
FAILED_STATES = ("FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE")
CONFIG_ENV = "GONKA_NETWORK_CONFIG"
"""Default of `gonka-hpc node --config`, exported by the nodes stage: an environment variable
rather than a flag in GONKA_NODE_ARGS, which slurm/gonka_node.sh word-splits (no quoting), so
a config path may hold spaces."""


@dataclass(frozen=True)
class SlurmSettings:
    """Where and how big: what an admin sets per site (flags of `gonka-hpc epoch schedule`)."""

    partition: str | None = None
    """Partition for every stage; None: the cluster's default."""
    account: str | None = None
    node_partition: str | None = None
    """Partition of the ML nodes only (e.g. the GPU one); None: `partition`."""
    node_qos: str | None = None
    """QOS of the ML nodes only, e.g. a preemptible one for idle-time work. The other stages
    are short or (validators) must not be preempted, so they keep the default QOS."""
    node_tasks: int = 1
    """ML-node array size: the spools are shared out over this many tasks."""
    node_gres: str | None = None
    """Per-task GRES of the ML nodes, e.g. "gpu:4" (the node maps it to tensor parallelism)."""
    node_cpus: int = 1
    node_time: str = "04:00:00"
    verify_tasks: int = 1
    validators: int = 4
    stage_time: str = "01:00:00"
    """Time limit of the short stages (assign, finalize, verify, settle, teardown)."""
    node_args: str = ""
    """Extra `gonka-hpc node` flags for every ML-node task (GONKA_NODE_ARGS)."""

    def __post_init__(self) -> None:
        flags = {"node_tasks": "--nodes", "node_cpus": "--node-cpus",
                 "verify_tasks": "--verifiers", "validators": "validators"}
        for name, flag in flags.items():
            if getattr(self, name) < 1:
                raise GonkaError(f"{flag} must be at least 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class EpochLayout:
    """The absolute paths a stage script needs."""

    dir: Path
    """The epoch dir: keys, genesis, inbox, ledger, spools, logs, outputs."""
    scripts: Path
    """The repo's slurm/ dir (gonka_node.sh, gonka_validators.sh, gonka_verify.sh)."""
    python: Path
    """The python that has gonka-hpc installed."""
    gonka_home: Path
    """Model cache, shared by every node."""
    model: str
    epoch: int
    config: Path | None = None
    """The network config: the ML nodes take their participant's engine settings from it."""

    @property
    def inbox(self) -> Path:
        return self.dir / "inbox"

    @property
    def keys(self) -> Path:
        return self.dir / "keys"


# --- rendering ---------------------------------------------------------------------------


def _q(value: object) -> str:
    return shlex.quote(str(value))


def _header(lay: EpochLayout, st: SlurmSettings, stage: str, *, array: int | None,
            time: str, extra: Sequence[str] = ()) -> list[str]:
    out = "logs/%x-%A_%a.out" if array else "logs/%x-%j.out"
    lines = ["#!/bin/bash",
             f"# gonka-hpc epoch {lay.epoch}, stage '{stage}': written by `gonka-hpc epoch "
             "schedule`; edit the",
             "# flags there, not here. Logs go to logs/ under the epoch dir (the submit dir).",
             f"#SBATCH --job-name=gonka-e{lay.epoch}-{stage}",
             f"#SBATCH --time={time}",
             "#SBATCH --open-mode=append",
             f"#SBATCH --output={out}"]
    if array:
        lines.append(f"#SBATCH --array=0-{array - 1}")
    nodes = stage == "nodes"
    for flag, value in (("partition", (nodes and st.node_partition) or st.partition),
                        ("account", st.account), ("qos", nodes and st.node_qos)):
        if value:
            lines.append(f"#SBATCH --{flag}={value}")
    if stage != "validators":
        lines.append("#SBATCH --kill-on-invalid-dep=yes")
    lines += [f"#SBATCH {x}" for x in extra]
    return lines


def _env(lay: EpochLayout, **extra: object) -> list[str]:
    base = {"GONKA_PYTHON": lay.python, "GONKA_HOME": lay.gonka_home,
            "GONKA_EPOCH_DIR": lay.dir, "GONKA_INBOX": lay.inbox, "GONKA_KEY_DIR": lay.keys}
    return [f"export {k}={_q(v)}" for k, v in {**base, **extra}.items()]


def _stage_cmd(lay: EpochLayout, stage: str) -> str:
    return (f'exec "$GONKA_PYTHON" -m gonka_hpc.cli.main epoch stage {stage} '
            '--dir "$GONKA_EPOCH_DIR"')


def node_args_line(st: SlurmSettings) -> str:
    """GONKA_NODE_ARGS of the nodes stage: the flags every `gonka-hpc node` run gets."""
    return f"--threads {st.node_cpus} {st.node_args}".strip()


def node_arg_words(st: SlurmSettings) -> list[str]:
    """GONKA_NODE_ARGS as slurm/gonka_node.sh hands it to the node: split like shell words
    (it uses xargs: quotes and backslashes as the shell reads them). ValueError if a quote
    is not closed."""
    return shlex.split(node_args_line(st))


def gres_gpus(gres: str | None) -> int | None:
    """GPUs per task that a --gres asks for ("gpu:4", "gpu:a100:2", "gpu" -> 4, 2, 1; None
    without a gpu entry): the task's $SLURM_GPUS_ON_NODE, which slurm/gonka_node.sh turns into
    the engine's tensor parallel size."""
    total = None
    for item in (gres or "").split(","):
        parts = item.strip().removeprefix("gres/").split(":")
        if parts[0] != "gpu":
            continue
        count = int(parts[-1]) if len(parts) > 1 and parts[-1].isdigit() else 1
        total = (total or 0) + count
    return total


def render_scripts(lay: EpochLayout, st: SlurmSettings) -> dict[str, str]:
    """Stage name -> the text of its batch script (teardown included)."""
    scripts: dict[str, list[str]] = {}
    scripts["validators"] = _header(lay, st, "validators", array=None, time="24:00:00",
                                    extra=[f"--ntasks={st.validators}", "--cpus-per-task=1"]) \
        + _env(lay, GONKA_GENESIS=lay.dir / "genesis.json",
               GONKA_LEDGER_DIR=lay.dir / "ledger", GONKA_LEDGER_ARGS="--interval 0.05") \
        + [f"exec bash {_q(lay.scripts / 'gonka_validators.sh')}"]
    for stage in ("assign", "finalize", "settle"):
        scripts[stage] = _header(lay, st, stage, array=None, time=st.stage_time) \
            + _env(lay) + [_stage_cmd(lay, stage)]
    node_extra = [f"--cpus-per-task={st.node_cpus}", "--requeue", "--signal=B:USR2@120"]
    if st.node_gres:
        node_extra.append(f"--gres={st.node_gres}")
    scripts["nodes"] = _header(lay, st, "nodes", array=st.node_tasks, time=st.node_time,
                               extra=node_extra) \
        + _env(lay, GONKA_SPOOL_ROOT=lay.dir / "spool", GONKA_MODEL=lay.model,
               GONKA_NODE_ARGS=node_args_line(st),
               **({CONFIG_ENV: lay.config} if lay.config else {})) \
        + [f"exec bash {_q(lay.scripts / 'gonka_node.sh')}"]
    scripts["verify"] = _header(lay, st, "verify", array=st.verify_tasks, time=st.stage_time) \
        + _env(lay) + [f"exec bash {_q(lay.scripts / 'gonka_verify.sh')}"]
    scripts[TEARDOWN] = _header(lay, st, TEARDOWN, array=None, time="00:10:00") \
        + _env(lay) + [_stage_cmd(lay, TEARDOWN)]
    return {name: "\n".join(scripts[name]) + "\n" for name in (*STAGES, TEARDOWN)}


def dependency(stage: str, jobs: dict[str, str]) -> str:
    """The --dependency of `stage`, given the ids of the stages submitted before it."""
    if stage == "assign":
        return f"after:{jobs['validators']}"  # once started: the ledger is coming up
    if stage == TEARDOWN:
        return "?".join(f"afternotok:{jobs[s]}" for s in STAGES[1:])
    return f"afterok:{jobs[STAGES[STAGES.index(stage) - 1]]}"


# --- submitting --------------------------------------------------------------------------


def _run(cmd: Sequence[str], *, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    if shutil.which(cmd[0]) is None:
        raise GonkaError(f"'{cmd[0]}' not found on PATH: is Slurm's client installed here "
                         "(Debian: apt-get install slurm-client) and SLURM_CONF set?")
    return subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, check=False,
                          timeout=120)


def submit_epoch(lay: EpochLayout, scripts: dict[str, str]) -> dict[str, str]:
    """Write the scripts under DIR/sbatch/, submit them in order, chained; returns stage ->
    job id (also written to DIR/jobs.json). If one submission fails, those already made are
    cancelled, so a half-scheduled epoch never runs."""
    sdir = lay.dir / "sbatch"
    sdir.mkdir(parents=True, exist_ok=True)
    (lay.dir / "logs").mkdir(exist_ok=True)
    jobs: dict[str, str] = {}
    for stage in (*STAGES, TEARDOWN):
        path = sdir / f"{stage}.sbatch"
        path.write_text(scripts[stage])
        cmd = ["sbatch", "--parsable"]
        if stage != "validators":
            cmd.append(f"--dependency={dependency(stage, jobs)}")
        res = _run([*cmd, str(path)], cwd=lay.dir)
        if res.returncode != 0:
            if jobs:
                _run(["scancel", *jobs.values()])
            raise GonkaError(f"sbatch of stage '{stage}' failed ({res.returncode}): "
                             f"{res.stderr.strip()}; cancelled the stages submitted before it "
                             f"({', '.join(jobs) or 'none'})")
        jobs[stage] = res.stdout.strip().split(";")[0]
    (lay.dir / JOBS_FILE).write_text(json.dumps(jobs, indent=1) + "\n")
    return jobs


def load_jobs(epoch_dir: Path) -> dict[str, str]:
    path = epoch_dir / JOBS_FILE
    if not path.exists():
        raise GonkaError(f"{path}: no such file; was this epoch scheduled with "
                         "`gonka-hpc epoch schedule`?")
    return json.loads(path.read_text())


# --- reading states ----------------------------------------------------------------------


@dataclass
class TaskState:
    """One job, or one array task, as slurmctld or slurmdbd knows it."""

    job_id: str
    state: str
    reason: str = ""
    exit_code: str = ""
    dependency: str = ""


@dataclass
class StageStatus:
    stage: str
    job_id: str
    state: str
    """Summary over the tasks: PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, ..."""
    why: str = ""
    tasks: list[TaskState] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _scontrol(job_id: str) -> list[TaskState]:
    res = _run(["scontrol", "show", "job", "-o", job_id])
    if res.returncode != 0:
        return []  # purged from slurmctld (MinJobAge): sacct has it
    tasks = []
    for line in res.stdout.splitlines():
        kv = dict(tok.split("=", 1) for tok in shlex.split(line) if "=" in tok)
        tid = kv.get("JobId", job_id)
        if kv.get("ArrayTaskId"):
            tid = f"{kv.get('ArrayJobId', job_id)}_{kv['ArrayTaskId']}"
        tasks.append(TaskState(tid, kv.get("JobState", "UNKNOWN"), kv.get("Reason", ""),
                               kv.get("ExitCode", ""), kv.get("Dependency", "")))
    return tasks


def _sacct(job_id: str) -> list[TaskState]:
    res = _run(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "JobID,State,ExitCode,Reason"])
    if res.returncode != 0:
        return []
    tasks = []
    for line in res.stdout.splitlines():
        parts = line.split("|")
        if len(parts) >= 4:
            tasks.append(TaskState(parts[0], parts[1].split()[0], parts[3], parts[2]))
    return tasks


def job_ended(job_id: str) -> str | None:
    """The job's final state if it has ended (slurmctld first, then sacct), else None."""
    tasks = _scontrol(job_id) or _sacct(job_id)
    state = _summarize(tasks) if tasks else None
    live = ("PENDING", "RUNNING", "COMPLETING", "CONFIGURING", "REQUEUED", "SUSPENDED")
    return state if state and state not in live else None


def _summarize(tasks: list[TaskState]) -> str:
    states = {t.state for t in tasks}
    for bad in ("FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE",
                "CANCELLED"):
        if bad in states:
            return bad
    for live in ("RUNNING", "COMPLETING", "REQUEUED", "SUSPENDED", "PENDING",
                 "CONFIGURING"):
        if live in states:
            return live
    return "COMPLETED" if states == {"COMPLETED"} else "/".join(sorted(states)) or "UNKNOWN"


def stage_status(epoch_dir: Path, jobs: dict[str, str]) -> list[StageStatus]:
    """Each stage's state, slurmctld first (current, exact for a job that just ended), then
    slurmdbd for jobs slurmctld has forgotten; with the reason for anything not fine."""
    out = []
    for stage in (*STAGES, TEARDOWN):
        if stage not in jobs:
            continue
        jid = jobs[stage]
        tasks = _scontrol(jid) or _sacct(jid)
        state = _summarize(tasks) if tasks else "UNKNOWN"
        out.append(StageStatus(stage, jid, state, tasks=tasks))
    failed: StageStatus | None = None  # the latest failed stage before the one at hand
    for s in out:
        s.why = _why(s, epoch_dir, failed)
        if s.state in FAILED_STATES:
            failed = s
    return out


def _why(s: StageStatus, epoch_dir: Path, failed: StageStatus | None) -> str:
    if s.stage == TEARDOWN:
        if s.state == "CANCELLED":
            return "not needed: no stage failed"
        if s.state == "PENDING":
            return "runs only if a stage fails"
        return "a stage failed: stopped the validators" if s.state == "COMPLETED" else ""
    if s.state in FAILED_STATES:
        bad = next((t for t in s.tasks if t.state == s.state), None)
        code = f" with exit code {bad.exit_code}" if bad and bad.exit_code else ""
        return f"{s.state.lower()}{code}; see {log_path(epoch_dir, s, bad)}"
    if s.state == "CANCELLED":
        if any(t.reason == "DependencyNeverSatisfied" for t in s.tasks) and failed:
            return f"cancelled by Slurm: stage '{failed.stage}' failed before it"
        return "cancelled (scancel or preemption without requeue)"
    if s.state == "PENDING":
        reasons = {t.reason for t in s.tasks if t.reason and t.reason != "None"}
        if reasons == {"Dependency"}:
            return "waiting for the stage before it"
        return ", ".join(sorted(reasons))
    return ""


def log_path(epoch_dir: Path, s: StageStatus, task: TaskState | None = None) -> Path:
    """Where the stage's (or task's) log is, following the scripts' --output pattern."""
    name = f"gonka-e*-{s.stage}"
    if s.stage in ARRAY_STAGES:
        idx = task.job_id.split("_", 1)[1] if task and "_" in task.job_id else "*"
        pattern = f"{name}-{s.job_id}_{idx}.out"
    else:
        pattern = f"{name}-{s.job_id}.out"
    found = sorted((epoch_dir / "logs").glob(pattern))
    return found[0] if found else epoch_dir / "logs" / pattern


def cancel(jobs: dict[str, str]) -> None:
    """scancel every job; the validators' chains are crash-safe, the ML nodes checkpoint."""
    res = _run(["scancel", *jobs.values()])
    if res.returncode != 0:
        raise GonkaError(f"scancel failed ({res.returncode}): {res.stderr.strip()}")
