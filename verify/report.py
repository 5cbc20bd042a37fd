"""The calibration report: a markdown table, the raw figures as JSON, a plot (PNG), and the
per-inference max margins (`scores.npz`, float32 class) behind the plot.

Detection is given two ways: over every cheating artifact, and over those whose output differs
from what the honest engine produces for the same request (an attack that happens to reproduce
the honest output exactly did the work's result, and no check can or needs to tell). Per epoch,
a cheater caught with probability p per request is caught with 1 - (1 - p)^m over m sampled
requests (`verify.statistics.detection_over`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gonka_hpc.fileutil import atomic_write_text

from .attacks import ATTACKS
from .statistics import critical_count, detection_over

if TYPE_CHECKING:
    from .calibrate import Calibration

LENGTHS = ("8", "16", "32", "64")
EPOCH_SAMPLES = (1, 5, 20)


def _pct(a: int, n: int) -> str:
    return f"{100 * a / n:.1f}% ({a}/{n})" if n else "n/a"


def markdown(table: dict[str, Any], record: dict[str, Any], timings: dict[str, float]) -> str:
    lines = ["# Verification calibration", "",
             f"- command: `{record['command']}`", f"- seed: {record['seed']}",
             f"- honest inferences: {record['honest']} fitted + {record['holdout']} holdout; "
             f"{record['attack_requests']} requests per attack; max_tokens "
             f"{record['max_tokens']}; a share of {record.get('full_share', 0):g} of the "
             "requests carry min_tokens = max_tokens (they run to the full length)",
             f"- run time: {record['seconds']} s", "",
             "## Thresholds per precision class", "",
             "| class | sampling_margin | margin_floor | floor_rate | topk_distance | "
             "sampled_logprob | positions over floor to fail at 8/16/32/64 |",
             "|---|---|---|---|---|---|---|"]
    for cname, t in table.items():
        th = t["thresholds"]
        crit = "/".join(str(critical_count(int(L), th["floor_rate"], 1e-6)) for L in LENGTHS)
        lines.append(f"| {cname} | {th['sampling_margin']:g} | {th['margin_floor']:g} | "
                     f"{th['floor_rate']:g} | {th['topk_distance']:g} | "
                     f"{th['sampled_logprob']:g} | {crit} |")
    lines += ["", "## Honest inferences flagged (false positives)", "",
              "| class | source | n | flagged at 8 | 16 | 32 | 64 |", "|---|---|---|---|---|---|---|"]
    for cname, t in table.items():
        for label, sets in (("", t["honest"]), (" (holdout)", t["holdout"] or {})):
            for src, d in sets.items():
                lines.append(f"| {cname} | {src}{label} | {d['n']} | "
                             + " | ".join(str(d[L]) for L in LENGTHS) + " |")
        total = sum(d["n"] for d in t["honest"].values()) + sum(
            d["n"] for d in (t["holdout"] or {}).values())
        flagged = sum(d["64"] for d in t["honest"].values()) + sum(
            d["64"] for d in (t["holdout"] or {}).values())
        lines.append(f"| {cname} | **all** | **{total}** | | | | **{flagged}** |")
    for cname, t in table.items():
        lines += ["", f"## Detection per attack, class {cname}", "",
                  "Share of cheating artifacts failed at each output length; the last columns "
                  "count only outputs that differ from the honest output (all of them, then "
                  "only those that ran to the full 64 tokens: most end earlier on EOS), and "
                  "per epoch "
                  f"the chance of catching a cheater over {'/'.join(map(str, EPOCH_SAMPLES))} "
                  "sampled requests.", "",
                  "| attack | 8 | 16 | 32 | 64 | 64, outputs that differ | full 64-token outputs "
                  "that differ | identical at 64 | per epoch (m sampled) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for aname in ATTACKS:
            row = t["attacks"].get(aname)
            if row is None:
                continue
            cells = [_pct(row[L]["caught"], row[L]["n"]) for L in LENGTHS]
            r64 = row["64"]
            p = r64["caught_differ"] / r64["differ"] if r64["differ"] else 0.0
            epoch = "/".join(f"{100 * detection_over(p, m):.1f}%" for m in EPOCH_SAMPLES)
            lines.append(f"| {aname} | " + " | ".join(cells) + f" | "
                         f"{_pct(r64['caught_differ'], r64['differ'])} | "
                         f"{_pct(r64['caught_full_differ'], r64['full_differ'])} | "
                         f"{r64['n'] - r64['differ']} | {epoch} |")
    for cname, t in table.items():
        lines += ["", f"## Detection by actual output length, class {cname}", "",
                  "Only cheating outputs that differ from the honest one and ran to at least L "
                  "tokens, judged on their first L tokens (the model ends most outputs early on "
                  "EOS, so long outputs are few).", "",
                  "| attack | >= 8 | >= 16 | >= 32 | = 64 |", "|---|---|---|---|---|"]
        for aname in ATTACKS:
            row = t["attacks"].get(aname)
            if row is not None:
                lines.append(f"| {aname} | " + " | ".join(
                    _pct(row[L]["caught_full_differ"], row[L]["full_differ"])
                    for L in LENGTHS) + " |")
    lines += ["", "## Time (s)", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in timings.items()]
    return "\n".join(lines) + "\n"


def plot(path: Path, cal: Calibration, table: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .calibrate import SOURCE_CLASS, margin_scores

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    lo = 1e-7
    bins = np.logspace(np.log10(lo), 2, 50)
    honest = [s for s in cal.honest + cal.holdout if SOURCE_CLASS[s.source] == "float32"]
    bf16 = [s for s in cal.honest + cal.holdout if SOURCE_CLASS[s.source] == "bfloat16"]
    for label, items, style in (("honest fp32", honest, dict(color="black", lw=2)),
                                ("honest bf16", bf16, dict(color="gray", lw=2, ls="--"))):
        if items:
            x = np.clip(margin_scores(items), lo, 100)
            ax1.hist(x, bins=bins, histtype="step", weights=np.full(x.size, 1 / x.size),
                     label=f"{label} ({len(items)})", **style)
    for aname in ATTACKS:
        if aname in cal.attacks and aname not in ("truncated", "logprob_noise"):
            x = np.clip(margin_scores(cal.attacks[aname]), lo, 100)
            ax1.hist(x, bins=bins, histtype="step", weights=np.full(x.size, 1 / x.size),
                     label=aname, alpha=0.8)
    for cname, ls in (("float32", ":"), ("bfloat16", "-.")):
        if cname in table:
            ax1.axvline(table[cname]["thresholds"]["sampling_margin"], color="red", ls=ls,
                        label=f"bound {cname}")
    ax1.set_xscale("log")
    ax1.set_xlabel(f"max sampling margin per inference (logprob units; 0 shown at {lo:g}, "
                   "inf at 100)")
    ax1.set_yscale("log")
    ax1.set_ylabel("share of inferences")
    ax1.set_title("Honest vs attack scores (64 tokens)")
    ax1.legend(fontsize=7, ncol=2)
    xs = [int(L) for L in LENGTHS]
    rows = table.get("float32", {}).get("attacks", {})
    for aname, row in rows.items():
        ys = [100 * row[L]["caught_differ"] / row[L]["differ"] if row[L]["differ"] else np.nan
              for L in LENGTHS]
        ax2.plot(xs, ys, marker="o", label=aname)
    ax2.set_xscale("log", base=2)
    ax2.set_xticks(xs, [str(x) for x in xs])
    ax2.set_xlabel("output length (tokens)")
    ax2.set_ylabel("detected, % of outputs that differ")
    ax2.set_title("Detection vs output length (float32 class)")
    ax2.axhline(99, color="gray", ls=":")
    ax2.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def rewrite_markdown(out: Path) -> None:
    """Re-render calibration.md from calibration.json (after a change to the report's layout)."""
    data = json.loads((out / "calibration.json").read_text())
    atomic_write_text(out / "calibration.md", markdown(data["table"], data["record"],
                                                       data["timings"]))


def write(out: Path, cal: Calibration, table: dict[str, Any], record: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "calibration.md", markdown(table, record, cal.timings))
    atomic_write_text(out / "calibration.json", json.dumps(
        {"record": record, "table": table, "timings": cal.timings}, indent=1))
    plot(out / "calibration.png", cal, table)
    from .calibrate import margin_scores  # per-inference scores, to re-plot or re-analyse

    arrays = {f"honest_{s}": margin_scores([x for x in cal.honest + cal.holdout
                                             if x.source == s])
              for s in {x.source for x in cal.honest + cal.holdout}}
    arrays.update({f"attack_{a}": margin_scores(items) for a, items in cal.attacks.items()})
    np.savez_compressed(out / "scores.npz", **arrays)
