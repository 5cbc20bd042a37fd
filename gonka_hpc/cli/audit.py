"""`gonka-hpc audit RUN_DIR`: replay an epoch offline, trusting nothing but the run's genesis.

What an auditor checks, in order:
1. the chains: RUN_DIR/genesis.json is the one document trusted; there is a chain dir
   ledger/validator-<i> for every validator i it names, each holding that genesis (another
   network's chains are a finding); every chain's hashes, links, commit certificates, every
   record's signature and state transition (`ledger.audit`); all chains hold the same blocks;
   none ends before the head that ledger/head.json names, and each one's head is the one
   summary.json names; the epoch is closed on chain;
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

Steps 2-4 replay the first chain that passed step 1; when none did, they are skipped (the
chain findings are the report). A batch whose artifact is missing or altered is not
re-scored: its verdict and votes cannot be judged from it, and the batch is already a finding.

Not yet checked here: that each request went to the executor the assignment block chooses
(the validators check it on admission), and that the TA derived each seed from the client's.

Exit 0 when everything holds, 3 when anything does not (each finding is printed), 2 when the
run dir cannot be audited at all (no genesis.json, no ledger/, nothing to learn the model
from for --rescore).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ledger.audit import (
    AuditResult,
    audit_chain,
    chain_dirs_of,
    check_head,
    check_head_file,
    compare_dirs,
    state_of,
)
from ledger.block import InvalidBlock
from ledger.chain import load_genesis_file
from ledger.state import replay

from ..errors import GonkaError, SignatureError
from ..randomness import choose_panel
from ..records import SignedRecord
from ..spool import Spool

DESCRIPTION = """\
Replay an epoch from its run dir, trusting nothing but RUN_DIR/genesis.json (the network's
genesis, as `gonka-hpc run` wrote it):
  chains     one ledger/validator-<i>/ per genesis validator, each holding that genesis;
             every block's hash, link, commit certificate, each record's signature and state
             transition; all chains the same; none shorter than ledger/head.json says; the
             head summary.json names; the epoch closed on chain
  batches    every committed artifact: file hash, Merkle root, executor signature, the
             assigned requests
  verdicts   the sample block is the batch's commit block, the verifier is the one it
             assigns; with --rescore, re-scoring the sample gives the same verdict
  disputes   every vote names the failing verdict's block and its signer is on the panel
             that block draws; with --rescore, re-scoring gives the same vote

output (stdout): an OK line per thing that holds; a DISPUTE line per dispute with its votes and
outcome (FAIL upholds the failing verdict, PASS overturns it, UNDECIDED when the epoch closed
without a majority); an OVERTURNED line per verifier whose failing verdict a panel overturned
(its reputation drops to 0); SKIP when a verdict cannot be re-scored because its artifact is
missing or altered (the batch is a finding); then a FINDING line for everything that does not
hold, or "audit OK". The replay uses the first chain that passes; if none does, only the chain
findings are reported.
"""

EPILOG = """\
examples:
  gonka-hpc audit runs/20261125-002155
  gonka-hpc audit runs/20261125-002155 --rescore

exit codes: 0 everything holds; 3 at least one FINDING (each is printed); 2 the run dir
cannot be audited (not a dir, no genesis.json or ledger/, no shard file to learn the model
from for --rescore: the ERROR line names the path)
"""


class AuditFailed(GonkaError):
    exit_code = 3


def add_parser(sub: Any) -> None:
    """The `audit` subcommand (main.py registers it)."""
    p = sub.add_parser("audit", help="replay an epoch offline: chains, artifacts, verdicts",
                       description=DESCRIPTION, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, help="a run dir written by `gonka-hpc run`")
    p.add_argument("--rescore", action="store_true",
                   help="also re-score every verdict's sample with the reference engine")


def run_command(args: argparse.Namespace) -> int:
    findings = audit_run(args.run_dir, rescore=args.rescore)
    for f in findings:
        print(f"FINDING {f}")
    if findings:
        raise AuditFailed(f"{len(findings)} finding(s) in {args.run_dir}")
    print(f"audit OK: {args.run_dir}")
    return 0


def _records(blocks: Any) -> list[tuple[int, SignedRecord]]:
    return [(s.height, SignedRecord.from_dict(r)) for s in blocks for r in s.block.records]


def _audit_chains(run_dir: Path, out: Any) -> tuple[dict[str, Any], list[AuditResult],
                                                     list[str]]:
    """(the trusted genesis, the chains that passed, findings) for the run's ledger/."""
    ledger = run_dir / "ledger"
    if not ledger.is_dir():
        raise GonkaError(f"{run_dir}: no ledger/ dir of validator chains (is it a run dir?)")
    gpath = run_dir / "genesis.json"
    genesis = load_genesis_file(gpath)
    n = len(state_of(genesis, gpath).validators)
    dirs, findings = chain_dirs_of(ledger, n)
    results: list[AuditResult] = []
    for d in dirs:
        try:
            result = audit_chain(d, expected_genesis=genesis, genesis_source=str(gpath))
        except InvalidBlock as exc:
            findings.append(f"{d}: height {exc.height}: {exc.reason}")
        except GonkaError as exc:
            msg = str(exc)
            findings.append(msg if msg.startswith(str(d)) else f"{d}: {msg}")
        else:
            print(result.summary(), file=out)
            results.append(result)
    if len(dirs) > 1:  # compared with a chain that passed, if any: it names the odd ones
        ref = [r.dir for r in results[:1]]
        findings += compare_dirs(ref + [d for d in dirs if d not in ref])
    findings += check_head_file(ledger, results)
    findings += _check_summary(run_dir / "summary.json", results)
    if results and not results[0].state.closed:
        findings.append(f"{results[0].dir}: epoch not closed: no epoch_close record on the "
                        "chain (blocks missing from the end?)")
    return genesis, results, findings


def _check_summary(path: Path, results: list[AuditResult]) -> list[str]:
    """Each chain's head must be the one summary.json names (when it names one)."""
    if not path.exists():
        return []
    try:
        chain = json.loads(path.read_bytes()).get("chain")
    except (OSError, ValueError, AttributeError) as exc:
        return [f"{path}: not a run summary: {exc}"]
    if not isinstance(chain, dict) or "height" not in chain or "head" not in chain:
        return []
    height, head = chain["height"], chain["head"]
    if type(height) is not int or not isinstance(head, str):
        return [f"{path}: chain.height / chain.head are not an integer and a hash"]
    return [p for r in results
            if (p := check_head(r, height, head, str(path), exact=True)) is not None]


def audit_run(run_dir: Path, *, rescore: bool, thresholds: Path | None = None,
              out: Any = None) -> list[str]:
    """All findings (empty when the epoch replays cleanly); prints progress to `out`
    (default: sys.stdout at the time of the call).

    Raises GonkaError (exit 2) when the run dir cannot be audited at all."""
    from verify.policy import assign_verifier

    out = sys.stdout if out is None else out
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise GonkaError(f"{run_dir}: {'not a directory' if run_dir.exists() else 'not found'}"
                         " (give a run dir written by `gonka-hpc run`)")
    genesis, results, findings = _audit_chains(run_dir, out)
    if not results:
        findings.append(f"{run_dir}: no chain passed the audit: batches, verdicts and "
                        "disputes were not checked")
        return findings
    result = results[0]  # the replay uses a chain that passed
    blocks = list(result.blocks)
    hashes = {s.hash: s.height for s in blocks}
    records = _records(blocks)
    state = result.state
    assigned = {(r.body["job_id"], r.body["shard_id"]): r.body for _, r in records
                if r.kind == "inference_assigned"}
    commits = {(r.body["job_id"], r.body["shard_id"]): r.body for _, r in records
               if r.kind == "artifact_batch_committed"}
    commit_height = {(r.body["job_id"], r.body["shard_id"]): h for h, r in records
                     if r.kind == "artifact_batch_committed"}
    bad: set[tuple[str, str]] = set()  # batches whose artifact is missing or altered
    for key, c in sorted(commits.items()):
        problem = _check_batch(run_dir, c, assigned.get(key), state, out)
        if problem:
            findings.append(f"batch {c['shard_id']}: {problem}")
            bad.add(key)
    engine = th = None
    if rescore:
        from verify.thresholds import load_thresholds

        from ..config import REPO_ROOT
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
            if key in bad:
                print(f"SKIP {where}: could not re-score: artifact missing/altered (see the "
                      f"batch {v['shard_id']} finding)", file=out)
                continue
            got = _rescore(run_dir, "verdict", engine, th, rec, v, assigned[key], commits[key],
                           state, before)
            if isinstance(got, str):
                findings.append(f"{where}: {got}")
                continue
            mismatch = _rescore_mismatch(where, got, v)
            if mismatch:
                findings.append(mismatch)
                continue
        print(f"OK {where}: {'PASS' if v['passed'] else 'FAIL'}, {v['checked']} checked"
              + (", re-scored identically" if engine is not None else ""), file=out)
    findings += _audit_disputes(run_dir, genesis, blocks, records, state, engine, th, bad, out)
    return findings


def _check_batch(run_dir: Path, c: dict[str, Any], assignment: dict[str, Any] | None,
                 state: Any, out: Any) -> str | None:
    """What is wrong with a committed batch's artifact, or None (and an OK line)."""
    from ..artifacts import file_sha256, read_batch  # h5py: only when there is a batch

    art = Spool(run_dir / "spool" / c["executor"]).artifact_path(c["shard_id"])
    if not art.exists():
        return f"artifact {art} is missing"
    if not art.is_file():
        return f"artifact {art} is not a file"
    try:
        if file_sha256(art) != c["file_sha256"]:
            return f"{art} is not the committed file (sha256 differs)"
        batch = read_batch(art)
        batch.verify(state.pubkey(c["executor"]) or "")
    except OSError as exc:
        return f"artifact {art} cannot be read: {exc.strerror or exc}"
    except (GonkaError, SignatureError) as exc:
        return str(exc)
    if batch.header.merkle_root != c["merkle_root"]:
        return "Merkle root is not the committed one"
    if assignment is None:
        return "no assignment on the chain for this batch"
    if [i.request_id for i in batch.inferences] != list(assignment["request_ids"]):
        return "requests differ from the assignment"
    print(f"OK batch {c['shard_id']}: {batch.header.n_requests} inferences, root "
          f"{c['merkle_root'][:16]}, signed by {c['executor']}", file=out)
    return None


def _rescore(run_dir: Path, what: str, engine: Any, th: Any, rec: SignedRecord,
             v: dict[str, Any], assigned: dict[str, Any], committed: dict[str, Any],
             state: Any, before: Any) -> dict[str, Any] | str:
    """The re-scored verdict or vote body, or why it could not be re-scored."""
    from verify.dispute import recheck
    from verify.verifier import verify_batch

    spool = Spool(run_dir / "spool" / v["executor"])
    shard_path = spool.inbox / f"{v['shard_id']}.json"
    try:
        shard = spool.load(shard_path)
    except OSError as exc:
        return f"could not re-score: shard file {shard_path}: {exc.strerror or exc}"
    except GonkaError as exc:
        return f"could not re-score: {exc}"
    common = dict(artifact=spool.artifact_path(v["shard_id"]), shard=shard, assigned=assigned,
                  committed=committed, executor_pubkey=state.pubkey(v["executor"]) or "",
                  reputation=before.reputation(v["executor"]), epoch=before.epoch)
    try:
        if what == "verdict":
            return verify_batch(_NoSign(rec.signer), engine, th, block_hash=v["sample_block"],
                                **common).verdict.body  # type: ignore[arg-type]
        return recheck(_NoSign(rec.signer), engine, th, sample_block=v["sample_block"],
                       dispute_block=v["dispute_block"], **common).vote.body  # type: ignore[arg-type]
    except (GonkaError, SignatureError, OSError) as exc:
        return f"could not re-score: {exc}"


def _rescore_mismatch(where: str, got: dict[str, Any], claimed: dict[str, Any]) -> str | None:
    """A finding when re-scoring disagrees with what a verdict or vote on chain says."""
    keys = ("passed", "checked", "failed")
    if all(got[k] == claimed[k] for k in keys):
        return None
    return (f"{where}: re-scoring gives " + " ".join(f"{k}={got[k]}" for k in keys)
            + ", the chain says " + " ".join(f"{k}={claimed[k]}" for k in keys))


def _audit_disputes(run_dir: Path, genesis: dict[str, Any], blocks: list[Any],
                    records: list[tuple[int, SignedRecord]], state: Any, engine: Any, th: Any,
                    bad: set[tuple[str, str]], out: Any) -> list[str]:
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
            if key in bad:
                print(f"SKIP {where}: could not re-score: artifact missing/altered (see the "
                      f"batch {v['shard_id']} finding)", file=out)
                continue
            got = _rescore(run_dir, "vote", engine, th, rec, v,
                           bodies["inference_assigned"][key][1].body, commit[1].body, state,
                           before)
            if isinstance(got, str):
                findings.append(f"{where}: {got}")
                continue
            mismatch = _rescore_mismatch(where, got, v)
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
    tried = []
    for shard in sorted(Path(run_dir, "spool").glob("*/inbox/*.json")):
        try:
            data = json.loads(shard.read_bytes())
            return str(data["model"]), int(data["k"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            tried.append(f"{shard}: {type(exc).__name__}: {exc}")
    if tried:
        raise GonkaError("no shard file names the model to re-score with: " + "; ".join(tried))
    raise GonkaError(f"{run_dir}: no shard files (spool/*/inbox/*.json) to learn the model from")
