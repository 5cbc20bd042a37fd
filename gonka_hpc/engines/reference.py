"""The reference engine: transformers' LlamaForCausalLM driven by hand, batched, on torch.

Runs anywhere torch runs (CPU by default), so every participant and verifier can execute and
re-score without a GPU. Generation is batched with left padding, an attention mask, explicit
position ids and a KV cache; each row samples with its own seed, parameters and output
position (`gonka_hpc.sampling`), and rows that finish are dropped from the batch and cache.
`score` runs one prefill pass per batch (right padding) and returns the raw logprob rows at
every output position.

Limits: one process, one device; no paged attention or continuous batching (rows join only at
the start of a batch). In fp32, batched output equals one-at-a-time output token for token on
the machines we measured; in reduced precision it may not.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..errors import ValidationError
from ..sampling import ban_eos, select_tokens
from .base import (
    Engine,
    Generation,
    GenerationRequest,
    Scoring,
    decode,
    output_text,
    stop_reached,
    stop_start,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class _Row:
    """Mutable state of one request during batched generation."""

    def __init__(self, req: GenerationRequest) -> None:
        self.req = req
        self.ids: list[int] = []
        self.lps: list[float] = []
        self.topk_ids: list[np.ndarray] = []
        self.topk_lps: list[np.ndarray] = []
        self.finish: str | None = None
        self.stop_from = 0  # stop strings count once they end past this character (min_tokens)


class ReferenceEngine(Engine):
    """Batched torch generation and prefill scoring with a local transformers Llama."""

    name = "reference"

    def __init__(self, model_dir: Path, k: int = 5, dtype: str = "float32", device: str = "cpu",
                 max_batch_size: int = 16, model_hash: str | None = None) -> None:
        from ..model import content_hash, load_model

        if dtype not in DTYPES:
            raise ValidationError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}",
                                  field="dtype")
        if k < 1:
            raise ValidationError(f"k must be >= 1, got {k}", field="k")
        if max_batch_size < 1:
            raise ValidationError(f"max_batch_size must be >= 1, got {max_batch_size}",
                                  field="max_batch_size")
        model_dir = Path(model_dir)
        self.model_dir = model_dir
        self.k = k
        self.dtype = dtype
        self.device = torch.device(device)
        self.max_batch_size = max_batch_size
        self.batch_hint = max_batch_size
        self.model_hash = model_hash if model_hash is not None else content_hash(model_dir)
        self.version = f"gonka-hpc {__version__} torch {torch.__version__}"
        self.model, self.tokenizer = load_model(model_dir, DTYPES[dtype])
        self.model.to(self.device)
        # transformers renamed the KV-cache argument (past_key_values -> cache) and silently
        # ignores the name it does not know; vLLM 0.32 pins a transformers from before.
        params = inspect.signature(self.model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self.vocab_size = int(self.model.config.vocab_size)
        self.max_model_len = int(self.model.config.max_position_embeddings)
        self.eos_id = int(self.tokenizer.eos_token_id)
        self.pad_id = int(self.tokenizer.pad_token_id)

    # --- generation -------------------------------------------------------------------------

    def generate(self, requests: Sequence[GenerationRequest],
                 progress: Callable[[int], None] | None = None) -> list[Generation]:
        for req in requests:
            self.check_request(req)
        # Similar prompt lengths share a batch (less padding); results keep request order.
        order = sorted(range(len(requests)), key=lambda i: len(requests[i].prompt_ids))
        results: list[Generation | None] = [None] * len(requests)
        for start in range(0, len(order), self.max_batch_size):
            chunk = order[start:start + self.max_batch_size]
            for i, gen in zip(chunk, self._generate_batch([requests[i] for i in chunk], progress),
                              strict=True):
                results[i] = gen
        return [g for g in results if g is not None]

    def _logprobs(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(logits.float(), dim=-1)

    @torch.inference_mode()
    def _generate_batch(self, reqs: list[GenerationRequest],
                        progress: Callable[[int], None] | None) -> list[Generation]:
        from transformers import DynamicCache

        rows = [_Row(r) for r in reqs]
        width = max(len(r.prompt_ids) for r in reqs)
        ids = torch.full((len(reqs), width), self.pad_id, dtype=torch.int64)
        mask = torch.zeros((len(reqs), width), dtype=torch.int64)
        for b, r in enumerate(reqs):
            ids[b, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids, dtype=torch.int64)
            mask[b, width - len(r.prompt_ids):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                         use_cache=True, logits_to_keep=1, **{self._cache_arg: cache})
        active = list(range(len(rows)))  # row index of each batch slot
        next_pos = positions[:, -1] + 1
        while True:
            lp = self._logprobs(out.logits[:, -1, :])
            live = [rows[a] for a in active]
            pos = [len(r.ids) for r in live]
            # min_tokens: EOS banned from the selection logprobs only; reported ones stay raw
            sel_lp = lp if all(p >= r.req.min_tokens for p, r in zip(pos, live, strict=True)) \
                else ban_eos(lp, pos, [r.req.min_tokens for r in live], self.eos_id)
            chosen = select_tokens(sel_lp, [r.req.seed for r in live], pos,
                                   [r.req.params for r in live])
            top = torch.topk(lp, self.k, dim=-1)
            top_ids = top.indices.to(torch.int32).cpu().numpy()
            top_lps = top.values.cpu().numpy()
            chosen_t = torch.tensor(chosen, dtype=torch.int64, device=lp.device)
            chosen_lps = lp.gather(1, chosen_t[:, None])[:, 0].cpu().numpy()
            for slot, row in enumerate(live):
                tok = chosen[slot]
                row.ids.append(tok)
                row.lps.append(float(chosen_lps[slot]))
                row.topk_ids.append(top_ids[slot])
                row.topk_lps.append(top_lps[slot])
                if row.req.stop and len(row.ids) == row.req.min_tokens:
                    row.stop_from = stop_start(self.tokenizer, row.ids, row.req.min_tokens)
                stopped = tok == self.eos_id or (
                    bool(row.req.stop) and len(row.ids) > row.req.min_tokens
                    and stop_reached(decode(self.tokenizer, row.ids), row.req.stop,
                                     row.stop_from))
                if stopped:
                    row.finish = "stop"
                elif len(row.ids) >= row.req.max_tokens:
                    row.finish = "length"
            if progress is not None:
                progress(len(live))
            keep = [slot for slot, row in enumerate(live) if row.finish is None]
            if not keep:
                break
            if len(keep) < len(live):
                sel = torch.tensor(keep, dtype=torch.int64, device=self.device)
                cache.batch_select_indices(sel)
                mask, next_pos, chosen_t = mask[sel], next_pos[sel], chosen_t[sel]
                active = [active[s] for s in keep]
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = self.model(input_ids=chosen_t[:, None], attention_mask=mask,
                             position_ids=next_pos[:, None], use_cache=True,
                             **{self._cache_arg: cache})
            next_pos = next_pos + 1
        return [self._finish(row) for row in rows]

    def _finish(self, row: _Row) -> Generation:
        n = len(row.ids)
        return Generation(
            request_id=row.req.request_id,
            output_ids=tuple(row.ids),
            token_logprobs=np.asarray(row.lps, dtype=np.float32),
            topk_ids=np.asarray(row.topk_ids, dtype=np.int32).reshape(n, self.k),
            topk_logprobs=np.asarray(row.topk_lps, dtype=np.float32).reshape(n, self.k),
            finish_reason=row.finish or "length",
            text=output_text(self.tokenizer, row.ids, row.req.stop, row.req.min_tokens),
        )

    # --- scoring ----------------------------------------------------------------------------

    def score(self, items: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[Scoring]:
        for prompt, output in items:
            self.check_item(prompt, output)
        order = sorted(range(len(items)), key=lambda i: len(items[i][0]) + len(items[i][1]))
        results: list[Scoring | None] = [None] * len(items)
        for start in range(0, len(order), self.max_batch_size):
            chunk = order[start:start + self.max_batch_size]
            for i, sc in zip(chunk, self._score_batch([items[i] for i in chunk]), strict=True):
                results[i] = sc
        return [s for s in results if s is not None]

    @torch.inference_mode()
    def _score_batch(self, items: list[tuple[Sequence[int], Sequence[int]]]) -> list[Scoring]:
        seqs = [list(p) + list(o) for p, o in items]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.int64)
        mask = torch.zeros((len(seqs), width), dtype=torch.int64)
        for b, s in enumerate(seqs):
            ids[b, :len(s)] = torch.tensor(s, dtype=torch.int64)
            mask[b, :len(s)] = 1
        hidden = self.model.model(input_ids=ids.to(self.device),
                                  attention_mask=mask.to(self.device),
                                  use_cache=False).last_hidden_state
        results = []
        for b, (prompt, output) in enumerate(items):
            n, start = len(output), len(prompt) - 1
            lp = self._logprobs(self.model.lm_head(hidden[b, start:start + n])).cpu()
            out_ids = torch.tensor(list(output), dtype=torch.int64)
            top = torch.topk(lp, self.k, dim=-1)
            results.append(Scoring(
                token_logprobs=lp.gather(1, out_ids[:, None])[:, 0].numpy().astype(np.float32),
                topk_ids=top.indices.to(torch.int32).numpy().reshape(n, self.k),
                topk_logprobs=top.values.numpy().astype(np.float32).reshape(n, self.k),
                full_logprobs=lp.contiguous(),
            ))
        return results
