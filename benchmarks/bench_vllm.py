"""The ML node on vLLM ÷ bare `LLM.generate`, and vLLM ÷ the reference engine, in one run.

One process, one machine, one job (the same prompts, parameters and max_tokens for every
contender), one `vllm.LLM` instance shared by the vLLM contenders:

1. bare: `engine.llm.generate` over the whole job with vLLM's own sampler (each request's
   temperature, top_p, top_k and seed as `vllm.SamplingParams`, no logprobs): what a site
   gets from vLLM without gonka.
   bare+lp: the same with `logprobs=k`, the top-k logprobs an artifact needs (separates
   their cost from that of gonka's sampling).
2. node: `gonka_hpc.node.run_shard` over the job as one shard in a spool: gonka's seeded
   sampling inside vLLM (the logits processor), top-k logprobs, per-batch checkpoints, output
   lines and the signed HDF5 artifact: what a site gets from `gonka-hpc node --engine vllm`.
3. engine: `VllmEngine.generate` over the whole job (node minus spool and artifact).
4. reference: `ReferenceEngine.generate` on the same job, batches of 16, one torch thread
   (as vLLM's CPU worker computes), run before vLLM starts (vLLM's idle engine processes
   would otherwise share the cores).

Throughput is generated tokens per second (bare samples other tokens than gonka, so its
outputs end at other lengths; tokens/s is the fair unit), by wall time and by CPU time of the
whole process tree (steadier when other jobs load the machine). The vLLM contenders run interleaved,
`--repeats` times each; medians are kept, and the median of the ratios within each round
(contenders back to back see the same load) is the steadiest figure on a shared machine.

Run: .venv/bin/python benchmarks/bench_vllm.py [--requests 256] [--max-tokens 64]
     [--repeats 3] [--node-batch N] [--profile OUT.prof]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PROMPTS = ["tell me a story", "count from 12 to 20", "what is 3 plus 4 ?", "list the settings",
           "tell me about the fox", "repeat the red dog", "count to seven in words",
           "the small cat", "a quick fox", "tell me about the owl"]
PARAMS = [(0.0, 1.0, 0), (0.7, 1.0, 0), (1.0, 1.0, 0), (1.0, 0.9, 0), (0.8, 0.95, 50),
          (1.0, 1.0, 40)]  # (temperature, top_p, top_k): greedy, plain, nucleus, top-k
"""The job's mix of sampling parameters, one per request in turn."""


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and every live descendant (vLLM's engine
    core and worker): the busy-waits of an idle vLLM count too, as they cost a node cores."""
    import psutil

    me = psutil.Process()
    total = 0.0
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system
    return total


def make_job(tokenizer, n: int, max_tokens: int):  # type: ignore[no-untyped-def]
    from gonka_hpc.spool import ShardRequest

    rng = random.Random(0)
    out = []
    for i in range(n):
        t, p, k = PARAMS[i % len(PARAMS)]
        text = rng.choice(PROMPTS)
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                            add_generation_prompt=True)["input_ids"]
        seed = rng.getrandbits(64)
        out.append(ShardRequest(f"b{i}", i + 1, f"b{i}", "/v1/completions", list(ids),
                                max_tokens, t, p, k, str(seed), [], None))
    return out


def bare(engine, job, logprobs: int | None = None) -> tuple[int, float]:  # type: ignore[no-untyped-def]
    from vllm import SamplingParams as VP
    from vllm import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=r.prompt_ids) for r in job]
    params = [VP(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k or 0,
                 seed=int(r.seed) % 2**63, max_tokens=r.max_tokens, detokenize=False,
                 logprobs=logprobs, flat_logprobs=True)
              for r in job]
    t = time.perf_counter()
    outs = engine.llm.generate(prompts, params, use_tqdm=False)
    dt = time.perf_counter() - t
    return sum(len(o.outputs[0].token_ids) for o in outs), dt


def generate(engine, job, batch: int) -> tuple[int, float]:  # type: ignore[no-untyped-def]
    from gonka_hpc.node import _gen_request

    reqs = [_gen_request(r) for r in job]
    t = time.perf_counter()
    n = 0
    for i in range(0, len(reqs), batch):
        n += sum(len(g.output_ids) for g in engine.generate(reqs[i:i + batch]))
    return n, time.perf_counter() - t


def node(engine, job, work: Path, batch: int, run: int) -> tuple[int, float]:  # type: ignore[no-untyped-def]
    from gonka_hpc.identity import Identity
    from gonka_hpc.node import run_shard
    from gonka_hpc.spool import Shard, Spool

    ident = Identity.from_seed("bench", b"\x07" * 32)
    shard = Shard("job-bench", f"shard-{run}", 1, "bench", "ta", "00" * 32, "gonka-tiny",
                  engine.model_hash, engine.k, job)
    spool = Spool(work / f"spool-{run}")
    spool.put(shard)
    t = time.perf_counter()
    res = run_shard(spool, shard, ident, engine, lambda r: r.record_id, batch_size=batch)
    return res.n_tokens, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--node-batch", type=int, default=None,
                    help="requests per engine batch in the node (default: the node's own)")
    ap.add_argument("--no-reference", action="store_true", help="skip the reference engine")
    ap.add_argument("--ref-threads", type=int, default=1,
                    help="torch threads of the reference engine (default 1: vLLM's CPU worker "
                    "also computes on one thread; 2 threads on a loaded 2-vCPU VM collapse)")
    ap.add_argument("--profile", type=Path, default=None,
                    help="also cProfile one node run into this file")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-vllm-"))
    try:
        run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, work: Path) -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CACHE_ROOT", str(work / "vllm-cache"))
    os.environ["TMPDIR"] = str(work)

    import torch

    from gonka_hpc.engines.reference import ReferenceEngine
    from gonka_hpc.engines.vllm import VllmEngine
    from gonka_hpc.model import ensure_model

    info = ensure_model("gonka-tiny", progress=False)
    runs: dict[str, list[float]] = {"bare": [], "bare+lp": [], "node": [], "engine": [],
                                    "reference": []}
    cpu_runs: dict[str, list[float]] = {k: [] for k in runs}

    def measure(name: str, rep: int, fn) -> None:  # type: ignore[no-untyped-def]
        c0 = cpu_seconds()
        n, dt = fn()
        cpu = cpu_seconds() - c0
        runs[name].append(n / dt)
        cpu_runs[name].append(n / cpu)
        print(f"  run {rep + 1} {name:9s} {n:6d} tokens {dt:7.2f} s {n / dt:8.0f} tok/s "
              f"{cpu:7.2f} CPU s {n / cpu:8.0f} tok/CPU s", flush=True)

    if not args.no_reference:
        # Before vLLM starts: its idle engine-core and worker processes would share the cores.
        threads = torch.get_num_threads()
        torch.set_num_threads(args.ref_threads)
        ref = ReferenceEngine(info.path, k=5, model_hash=info.content_hash)
        job = make_job(ref.tokenizer, args.requests, args.max_tokens)
        generate(ref, job[:8], 8)
        for rep in range(args.repeats):
            measure("reference", rep, lambda: generate(ref, job, ref.batch_hint))
        del ref
        torch.set_num_threads(threads)
    t = time.perf_counter()
    engine = VllmEngine(info.path, k=5, model_hash=info.content_hash,
                        max_num_seqs=args.max_num_seqs)
    load_s = time.perf_counter() - t
    job = make_job(engine.tokenizer, args.requests, args.max_tokens)
    node_batch = args.node_batch or engine.batch_hint
    print(f"vLLM load {load_s:.1f} s; {len(job)} requests, max_tokens {args.max_tokens}, "
          f"max_num_seqs {args.max_num_seqs}, node batch {node_batch}, "
          f"torch threads {torch.get_num_threads()}", flush=True)

    bare(engine, job[:8])  # warm up both paths
    generate(engine, job[:8], 8)
    for rep in range(args.repeats):
        measure("bare", rep, lambda: bare(engine, job))
        measure("bare+lp", rep, lambda: bare(engine, job, engine.k))
        measure("node", rep, lambda rep=rep: node(engine, job, work, node_batch, rep))
        measure("engine", rep, lambda: generate(engine, job, len(job)))
    if args.profile:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
        node(engine, job, work, node_batch, 999)
        prof.disable()
        prof.dump_stats(args.profile)
    # Each round runs its contenders back to back, so a ratio within a round sees the same
    # machine load; the median over rounds is the steadiest figure on a shared machine.
    paired = {f"{a} ÷ {b}": statistics.median(x / y for x, y in zip(runs[a], runs[b]))
              for a, b in (("node", "bare"), ("engine", "bare"), ("engine", "bare+lp"))}
    print("\nmedian of per-round ratios (wall): "
          + ", ".join(f"{k} {v:.2f}" for k, v in paired.items()))
    for unit, table in (("tokens/s (wall)", runs), ("tokens per CPU second", cpu_runs)):
        med = {k: statistics.median(v) for k, v in table.items() if v}
        print(f"\nmedian {unit}: " + ", ".join(f"{k} {v:.0f}" for k, v in med.items()))
        print(f"  node ÷ bare LLM.generate:   {med['node'] / med['bare']:.2f}")
        print(f"  engine ÷ bare LLM.generate: {med['engine'] / med['bare']:.2f}")
        print(f"  engine ÷ bare with top-k logprobs: {med['engine'] / med['bare+lp']:.2f}")
        if "reference" in med:
            print(f"  vLLM node ÷ reference:      {med['node'] / med['reference']:.2f}")
            print(f"  vLLM engine ÷ reference:    {med['engine'] / med['reference']:.2f}")
    engine.close()


if __name__ == "__main__":
    main()
