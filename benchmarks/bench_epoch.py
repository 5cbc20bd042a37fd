"""Network throughput ÷ bare engine throughput, and artifact bytes per generated token.

One script, one machine, the same job and the same engine (reference, fp32, CPU):

1. bare: `ReferenceEngine.generate` over the job's requests in this process, with all the
   machine's threads, batches of 16 (the ML node's default): generated tokens per second.
2. network: `gonka-hpc run` on the same job: 4 MPI validators, one ML-node process per
   executor, signed HDF5 artifacts, verification of every inference (reputation 0) and
   settlement. Throughput = generated tokens / whole-epoch wall time; also over the
   inference stage alone.

Both are measured in the same run, so the ratio holds on a noisy machine.
Run: .venv/bin/python benchmarks/bench_epoch.py [--requests 64] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gonka_hpc.engines.base import GenerationRequest  # noqa: E402
from gonka_hpc.engines.reference import ReferenceEngine  # noqa: E402
from gonka_hpc.model import ensure_model  # noqa: E402
from gonka_hpc.sampling import SamplingParams, derive_seed  # noqa: E402

PROMPTS = ["the small cat", "a quick fox", "tell me about the owl", "the dog is happy and it",
           "list the settings : name=alice ;", "a gentle horse jumps", "the old wolf howls",
           "count to nine in words :", "what is 3 plus 4 ? :", "the curious bee"]


def make_job(path: Path, n: int, max_tokens: int) -> None:
    rng = random.Random(0)
    with open(path, "w") as fh:
        for i in range(n):
            body = {"model": "gonka-tiny", "prompt": rng.choice(PROMPTS),
                    "max_tokens": max_tokens, "temperature": rng.choice([0.0, 0.7, 1.0]),
                    "seed": i}
            fh.write(json.dumps({"custom_id": f"b{i}", "method": "POST",
                                 "url": "/v1/completions", "body": body}) + "\n")


def bare(job: Path, batch: int) -> tuple[int, float]:
    info = ensure_model("gonka-tiny", progress=False)
    engine = ReferenceEngine(info.path, k=5, model_hash=info.content_hash)
    reqs = []
    for line in job.read_text().splitlines():
        d = json.loads(line)
        b = d["body"]
        reqs.append(GenerationRequest(
            d["custom_id"], tuple(engine.tokenizer.encode(b["prompt"])), b["max_tokens"],
            SamplingParams(b["temperature"], 1.0, 0), derive_seed("00" * 32, d["custom_id"],
                                                                  b["seed"])))
    engine.generate(reqs[:2])  # warm up
    t = time.perf_counter()
    tokens = 0
    for i in range(0, len(reqs), batch):
        tokens += sum(len(g.output_ids) for g in engine.generate(reqs[i:i + batch]))
    return tokens, time.perf_counter() - t


def network(job: Path, work: Path) -> dict:
    out = work / "run"
    subprocess.run([sys.executable, "-m", "gonka_hpc.cli.main", "run", str(job), "--out",
                    str(out), "--quiet"], check=True, stdout=subprocess.DEVNULL,
                   env={**os.environ, "PYTHONWARNINGS": "ignore"})
    s = json.loads((out / "summary.json").read_text())
    s["artifact_bytes"] = sum(p.stat().st_size for p in out.glob("spool/*/out/*.h5"))
    s["output_bytes"] = sum(p.stat().st_size for p in out.glob("outputs/*.jsonl"))
    return s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        job = Path(tmp) / "bench.jsonl"
        make_job(job, args.requests, args.max_tokens)
        b_tokens, b_secs = bare(job, 16)
        s = network(job, Path(tmp))
    n_tokens, wall = s["tokens_generated"], s["wall_seconds"]
    infer = s["stage_seconds"]["inference"]
    bare_tps = b_tokens / b_secs
    print(f"job: {args.requests} requests, max_tokens {args.max_tokens}")
    print(f"bare engine        {b_tokens} tokens in {b_secs:.2f} s = {bare_tps:.0f} tokens/s")
    print(f"network, epoch     {n_tokens} tokens in {wall:.2f} s = {n_tokens / wall:.0f} tokens/s"
          f"  -> ratio {n_tokens / wall / bare_tps:.2f}")
    print(f"network, inference {n_tokens} tokens in {infer:.2f} s = {n_tokens / infer:.0f} "
          f"tokens/s  -> ratio {n_tokens / infer / bare_tps:.2f}")
    print(f"stages (s)         {json.dumps(s['stage_seconds'])}")
    print(f"artifact bytes per generated token: {s['artifact_bytes'] / n_tokens:.1f} "
          f"({s['artifact_bytes']} bytes HDF5 for {n_tokens} tokens, k=5)")
    print(f"output JSONL bytes per generated token: {s['output_bytes'] / n_tokens:.1f}")


if __name__ == "__main__":
    main()
