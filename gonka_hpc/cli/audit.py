"""`gonka-hpc audit RUN_DIR`: replay an epoch offline, trusting nothing but genesis.

What an auditor checks, in order:
1. every validator chain: hashes, links, commit certificates, every record's signature and
   state transition (`ledger.audit`), and that all chains are byte-identical;
2. every committed artifact batch: the file's sha256 is the committed one, its leaves hash to
   the committed Merkle root, the executor signed it, and it holds exactly the assigned
   requests;
3. every verdict: it sampled from the block that holds the batch's commit, its verifier is the
   one that block assigns, and (with `--rescore`) re-scoring the same sample gives the same
   verdict;
4. every dispute: each vote names the block holding the failing verdict, its signer is on the
   panel that block draws, and (with `--rescore`) re-scoring gives the same vote; the outcome
   and any overturned verdict are printed. A passing verdict opens no dispute: a verifier
   that passed a cheating batch is found by `--rescore` (the re-scored verdict differs).

Not yet checked here: that each request went to the executor the assignment block chooses
(the validators check it on admission), and that the TA derived each seed from the client's.

Exit 0 when everything holds, 3 when anything does not (each finding is printed).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from ledger.audit import audit_chain, compare_dirs
from ledger.chain import read_chain
from ledger.state import replay
from verify.dispute import recheck
from verify.policy import assign_verifier
from verify.thresholds import load_thresholds
from verify.verifier import verify_batch

from ..artifacts import file_sha256, read_batch
from ..config import REPO_ROOT
from ..errors import GonkaError, SignatureError
from ..randomness import choose_panel
from ..records import SignedRecord
from ..spool import Spool


class AuditFailed(GonkaError):
    exit_code = 3


def _records(blocks: list[Any]) -> list[tuple[int, SignedRecord]]:
    return [(s.height, SignedRecord.from_dict(r)) for s in blocks for r in s.block.records]


def audit_run(run_dir: Path, *, rescore: bool, thresholds: Path | None = None,
              out=sys.stdout) -> list[str]:  # type: ignore[no-untyped-def]
    """All findings (empty when the epoch replays cleanly); prints progress to `out`."""
    run_dir = Path(run_dir)
    dirs = sorted((run_dir / "ledger").glob("validator-*"))
    if not dirs:
        raise GonkaError(f"{run_dir}: no ledger/validator-* chain dirs (is it a run dir?)")
    findings: list[str] = []
    result = None
    for d in dirs:
        try:
            result = audit_chain(d)
            print(result.summary(), file=out)
        except GonkaError as exc:
            findings.append(f"{d}: {exc}")
    findings += compare_dirs(dirs)
    if result is None:
        return findings
    blocks = read_chain(dirs[0])
    genesis = json.loads((dirs[0] / "genesis.json").read_text())
    hashes = {s.hash: s.height for s in blocks}
    records = _records(blocks)
    state = result.state
    assigned = {(r.body["job_id"], r.body["shard_id"]): r.body for _, r in records
                if r.kind == "inference_assigned"}
    commits = {(r.body["job_id"], r.body["shard_id"]): r.body for _, r in records
               if r.kind == "artifact_batch_committed"}
    commit_height = {(r.body["job_id"], r.body["shard_id"]): h for h, r in records
                     if r.kind == "artifact_batch_committed"}
    for key, c in sorted(commits.items()):
        art = Spool(run_dir / "spool" / c["executor"]).artifact_path(c["shard_id"])
        where = f"batch {c['shard_id']}"
        if not art.exists():
            findings.append(f"{where}: artifact {art} is missing")
            continue
        if file_sha256(art) != c["file_sha256"]:
            findings.append(f"{where}: {art} is not the committed file (sha256 differs)")
            continue
        try:
            batch = read_batch(art)
            batch.verify(state.pubkey(c["executor"]) or "")
        except (GonkaError, SignatureError) as exc:
            findings.append(f"{where}: {exc}")
            continue
        if batch.header.merkle_root != c["merkle_root"]:
            findings.append(f"{where}: Merkle root is not the committed one")
        if [i.request_id for i in batch.inferences] != list(assigned[key]["request_ids"]):
            findings.append(f"{where}: requests differ from the assignment")
        print(f"OK {where}: {batch.header.n_requests} inferences, root "
              f"{c['merkle_root'][:16]}, signed by {c['executor']}", file=out)
    engine = th = None
    if rescore:
        from ..engines.loader import load_engine

        th = load_thresholds(thresholds or REPO_ROOT / "configs" / "verification.yaml")
        model, k = _model_of(run_dir)
        engine = load_engine(model, k=k)
    for _height, rec in records:
        if rec.kind != "verdict":
            continue
        v = rec.body
        where = f"verdict on {v['shard_id']} by {rec.signer}"
        h = hashes.get(v["sample_block"])
        key = (v["job_id"], v["shard_id"])
        if h is None or h != commit_height.get(key):
            findings.append(f"{where}: sample block {v['sample_block'][:16]} is not the block "
                            "that holds the batch's commit")
            continue
        before = replay(genesis, [s.block for s in blocks[:h]])
        weights = {n: p.weight for n, p in before.participants().items()}
        expected = assign_verifier(v["sample_block"], v["shard_id"], v["executor"], weights)
        if rec.signer != expected:
            findings.append(f"{where}: block {v['sample_block'][:16]} assigns '{expected}'")
        if engine is not None and th is not None:
            spool = Spool(run_dir / "spool" / v["executor"])
            shard = spool.load(spool.inbox / f"{v['shard_id']}.json")
            check = verify_batch(
                _NoSign(rec.signer), engine, th, artifact=spool.artifact_path(v["shard_id"]),
                shard=shard, assigned=assigned[key], committed=commits[key],
                executor_pubkey=state.pubkey(v["executor"]) or "",
                reputation=before.reputation(v["executor"]), block_hash=v["sample_block"],
                epoch=before.epoch)
            mismatch = _rescore_mismatch(where, check.verdict.body, v)
            if mismatch:
                findings.append(mismatch)
                continue
        print(f"OK {where}: {'PASS' if v['passed'] else 'FAIL'}, {v['checked']} checked"
              + (", re-scored identically" if engine is not None else ""), file=out)
    findings += _audit_disputes(run_dir, genesis, blocks, records, state, engine, th, out)
    return findings


def _rescore_mismatch(where: str, got: dict[str, Any], claimed: dict[str, Any]) -> str | None:
    """A finding when re-scoring disagrees with what a verdict or vote on chain says."""
    keys = ("passed", "checked", "failed")
    if all(got[k] == claimed[k] for k in keys):
        return None
    return (f"{where}: re-scoring gives " + " ".join(f"{k}={got[k]}" for k in keys)
            + ", the chain says " + " ".join(f"{k}={claimed[k]}" for k in keys))


def _audit_disputes(run_dir: Path, genesis: dict[str, Any], blocks: list[Any],
                    records: list[tuple[int, SignedRecord]], state: Any, engine: Any, th: Any,
                    out: Any) -> list[str]:
    """Check every dispute vote against the panel its block draws; print each outcome."""
    findings: list[str] = []
    hashes = {s.hash: s.height for s in blocks}
    bodies = {kind: {(r.body["job_id"], r.body["shard_id"]): (h, r) for h, r in records
                     if r.kind == kind} for kind in ("inference_assigned",
                                                     "artifact_batch_committed", "verdict")}
    size = int(genesis["params"].get("dispute_panel_size", 3))
    for _height, rec in records:
        if rec.kind != "dispute_vote":
            continue
        v = rec.body
        key = (v["job_id"], v["shard_id"])
        where = f"dispute vote on {v['shard_id']} by {rec.signer}"
        verdict = bodies["verdict"].get(key)
        commit = bodies["artifact_batch_committed"].get(key)
        if verdict is None or commit is None or verdict[1].body["passed"]:
            findings.append(f"{where}: no failing verdict opened a dispute on the batch")
            continue
        if hashes.get(v["dispute_block"]) != verdict[0]:
            findings.append(f"{where}: dispute block {v['dispute_block'][:16]} is not the "
                            "block that holds the failing verdict")
            continue
        before = replay(genesis, [s.block for s in blocks[:commit[0]]])
        weights = {n: p.weight for n, p in before.participants().items()}
        panel = choose_panel(v["dispute_block"], v["shard_id"],
                             {v["executor"], verdict[1].signer}, weights, size)
        if rec.signer not in panel:
            findings.append(f"{where}: block {v['dispute_block'][:16]} draws the panel {panel}")
            continue
        if engine is not None and th is not None:
            spool = Spool(run_dir / "spool" / v["executor"])
            check = recheck(
                _NoSign(rec.signer), engine, th, artifact=spool.artifact_path(v["shard_id"]),
                shard=spool.load(spool.inbox / f"{v['shard_id']}.json"),
                assigned=bodies["inference_assigned"][key][1].body, committed=commit[1].body,
                executor_pubkey=state.pubkey(v["executor"]) or "",
                reputation=before.reputation(v["executor"]), sample_block=v["sample_block"],
                dispute_block=v["dispute_block"], epoch=before.epoch)
            mismatch = _rescore_mismatch(where, check.vote.body, v)
            if mismatch:
                findings.append(mismatch)
                continue
        print(f"OK {where}: {'PASS' if v['passed'] else 'FAIL'}, {v['checked']} checked, on "
              f"the panel {panel}" + (", re-scored identically" if engine is not None else ""),
              file=out)
    settlement = state.settlement or {}
    for d in state.disputes():
        outcome = "undecided" if d.outcome == "open" else d.outcome
        print(f"DISPUTE {d.shard_id}: {d.executor}'s batch, failing verdict by {d.verifier}, "
              f"panel {list(d.panel or [])}, votes {dict(d.votes)} -> {outcome.upper()}"
              + ("" if settlement else " (epoch not closed)"), file=out)
    for name in settlement.get("overturned", []):
        print(f"OVERTURNED {name}: a panel overturned its failing verdict (reputation 0)",
              file=out)
    return findings


class _NoSign:
    """Stands in for the verifier's key: the auditor recomputes, it signs nothing."""

    def __init__(self, name: str) -> None:
        self.name = name

    def sign(self, message: bytes) -> str:
        return ""


def _model_of(run_dir: Path) -> tuple[str, int]:
    """The network model's name and k, as the transfer agent wrote them into the shards."""
    shard = next(Path(run_dir, "spool").glob("*/inbox/*.json"), None)
    if shard is None:
        raise GonkaError(f"{run_dir}: no shard files to learn the model from")
    data = json.loads(shard.read_text())
    return data["model"], int(data["k"])
