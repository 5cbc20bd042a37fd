"""Gonka's seeded verifiable sampling inside vLLM: a V1 logits processor.

vLLM samples with its own RNG; gonka needs every token to be the pure function of the raw
logprobs and the ledger-derived seed that `gonka_hpc.sampling.select_tokens` defines, so a
verifier can check it after one prefill. `GonkaSamplingProcessor` makes vLLM's greedy argmax
pick exactly that token:

- A request opts in by carrying `SamplingParams(extra_args={EXTRA_KEY: request_args(...)})`
  (seed and gonka's temperature / top-p / top-k) and asking vLLM for greedy decoding
  (`temperature=0`, no top-k / top-p / penalties), so nothing in vLLM's sampler after the
  processors touches the row except the argmax.
- For each such row, the processor computes the raw logprobs exactly as vLLM reports them in
  `raw_logprobs` mode (`log_softmax` in float32 of the float32 logits), picks the token with
  `select_tokens` (float64: `lp / T + gumbel(seed, position, .)` over `allowed_mask`, greedy at
  T = 0) and overwrites the row with 0 at that token and -inf elsewhere. The one-hot row, rather
  than the noisy scores themselves, keeps the choice exact: writing float64 scores back into the
  float32 logits could merge two near-equal scores into a tie that vLLM's argmax breaks
  differently.
- The output position is the request's number of output tokens so far (0-based), read from the
  live `output_tok_ids` list vLLM hands to `update_state` (as vLLM's own min-tokens processor
  does). That holds with synchronous scheduling only, so the engine turns async scheduling off.
- `min_tokens` (with the EOS id) travels in the same extra args: rows whose position is below
  it get EOS at -inf in the selection logprobs (`sampling.ban_eos`) before `select_tokens`, as
  the reference engine does. The engine also passes vLLM's own `min_tokens`, so vLLM's
  detokenizer ignores stop strings before it, and vLLM's MinTokensLogitsProcessor (a builtin,
  applied before this one) has already put EOS at -inf in those rows' logits: the log_softmax
  here then differs from the raw one by a constant per row (plus float32 rounding), which no
  selection step sees.
- Rows without `EXTRA_KEY` are returned untouched.

Cost: one batched `select_tokens` per decode step over the opted-in rows (the Gumbel hash of
every (row, token) at once, top-k without a sort, one sort only for nucleus rows without top-k
— as vLLM's own sampler sorts for top-p), a few torch kernels whatever the batch size; Python
work per step is per row only for parameter bookkeeping. Limits: speculative decoding is not
supported (one token per step assumed).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from ..sampling import SamplingParams, ban_eos, select_tokens

if TYPE_CHECKING:
    from vllm import SamplingParams as VllmSamplingParams
    from vllm.config import VllmConfig

EXTRA_KEY = "gonka"
"""Key in `vllm.SamplingParams.extra_args` that carries a request's gonka sampling."""


def request_args(seed: int, params: SamplingParams, min_tokens: int = 0,
                 eos_id: int | None = None) -> dict[str, Any]:
    """The `extra_args[EXTRA_KEY]` value for one request (seed as a decimal string: 64 bits);
    `eos_id` is needed when `min_tokens` > 0."""
    out = {"seed": str(int(seed)), "temperature": float(params.temperature),
           "top_p": float(params.top_p), "top_k": int(params.top_k)}
    if min_tokens:
        out.update(min_tokens=int(min_tokens), eos_id=eos_id)
    return out


def parse_min_tokens(extra: dict[str, Any]) -> tuple[int, int]:
    """(min_tokens, eos_id) from an `extra_args[EXTRA_KEY]` value ((0, -1) when absent)."""
    m = extra.get("min_tokens", 0)
    if isinstance(m, bool) or not isinstance(m, int) or m < 0:
        raise ValueError(f"extra_args[{EXTRA_KEY!r}]['min_tokens'] must be an integer >= 0")
    if not m:
        return 0, -1
    eos = extra.get("eos_id")
    if isinstance(eos, bool) or not isinstance(eos, int) or eos < 0:
        raise ValueError(f"extra_args[{EXTRA_KEY!r}]['eos_id'] must be a token id when "
                         "min_tokens > 0")
    return m, eos


def parse_args(extra: dict[str, Any]) -> tuple[int, SamplingParams]:
    """(seed, params) from an `extra_args[EXTRA_KEY]` value; ValueError names the bad field."""
    if not isinstance(extra, dict):
        raise ValueError(f"extra_args[{EXTRA_KEY!r}] must be a dict, got {type(extra).__name__}")
    try:
        seed = int(extra["seed"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"extra_args[{EXTRA_KEY!r}]['seed'] must be an integer "
                         "(a decimal string for 64-bit seeds)") from None
    if not 0 <= seed < 2**64:
        raise ValueError(f"extra_args[{EXTRA_KEY!r}]['seed'] must be unsigned 64-bit")
    params = SamplingParams(temperature=extra.get("temperature", 1.0),
                            top_p=extra.get("top_p", 1.0), top_k=extra.get("top_k", 0))
    return seed, params


class GonkaSamplingProcessor(LogitsProcessor):
    """Replaces vLLM's sampling of opted-in requests with gonka's seeded Gumbel-max choice."""

    @classmethod
    def validate_params(cls, sampling_params: VllmSamplingParams) -> None:
        extra = (sampling_params.extra_args or {}).get(EXTRA_KEY)
        if extra is None:
            return
        parse_args(extra)
        parse_min_tokens(extra)
        if sampling_params.temperature != 0:
            raise ValueError("requests carrying gonka sampling must ask vLLM for greedy "
                             "decoding (temperature=0): the processor makes the argmax the "
                             "sampled token")

    def __init__(self, vllm_config: VllmConfig, device: torch.device,
                 is_pin_memory: bool) -> None:
        self.device = device
        # batch row -> (seed, params, live list of the request's output token ids,
        # min_tokens, EOS id)
        self.rows: dict[int, tuple[int, SamplingParams, list[int], int, int]] = {}

    def is_argmax_invariant(self) -> bool:
        return False  # it decides the argmax

    @staticmethod
    def _new_row(params: VllmSamplingParams, _prompt: list[int] | None,
                 output_tok_ids: list[int]
                 ) -> tuple[int, SamplingParams, list[int], int, int] | None:
        extra = (params.extra_args or {}).get(EXTRA_KEY)
        if extra is None:
            return None
        seed, gparams = parse_args(extra)
        return (seed, gparams, output_tok_ids, *parse_min_tokens(extra))

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self.rows, batch_update, self._new_row)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            return logits
        idx = sorted(i for i in self.rows if i < logits.shape[0])
        if not idx:
            return logits
        index = torch.tensor(idx, dtype=torch.int64, device=logits.device)
        # Exactly vLLM's raw logprobs (Sampler.compute_logprobs) for these rows.
        lp = logits.index_select(0, index).log_softmax(dim=-1, dtype=torch.float32)
        states = [self.rows[i] for i in idx]
        pos = [len(s[2]) for s in states]
        banned = [(j, s[4]) for j, (p, s) in enumerate(zip(pos, states, strict=True))
                  if p < s[3]]
        for eos in {e for _, e in banned}:  # one ban_eos per EOS id (one in practice)
            rows = [j for j, e in banned if e == eos]
            sub = ban_eos(lp[rows], [pos[j] for j in rows], [states[j][3] for j in rows], eos)
            lp[rows] = sub
        chosen = select_tokens(lp, [s[0] for s in states], pos, [s[1] for s in states])
        onehot = torch.full((len(idx), logits.shape[1]), -torch.inf, dtype=logits.dtype,
                            device=logits.device)
        onehot[torch.arange(len(idx), device=logits.device),
               torch.tensor(chosen, dtype=torch.int64, device=logits.device)] = 0.0
        logits.index_copy_(0, index, onehot)
        return logits
