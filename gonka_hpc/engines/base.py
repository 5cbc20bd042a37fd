"""The engine interface: every inference backend fills in `generate` and `score`.

Like submitit's executors, backends (the reference torch engine, vLLM) sit behind one small
interface, and the pipeline never asks which one it has. An engine

- `generate`s: samples each request with `gonka_hpc.sampling` (seeded Gumbel-max over raw
  logprobs) and returns, per sampled token, its raw logprob and the top-k raw logprobs: the
  verification artifact;
- `score`s: one prefill pass over prompt + output, returning the same quantities plus the full
  raw logprob rows the verifier recomputes sampling margins from.

Raw logprobs are `log_softmax(logits)` in float32, before temperature, top-k and top-p (vLLM's
`raw_logprobs`). Stop rules, shared by all backends (`stop_reached`, `output_text`): EOS ends a
request with "stop"; a stop string ends it as soon as the decoded text contains it, keeping
every sampled token (each must stay verifiable) and cutting the text before the stop string;
`max_tokens` ends it with "length". Decoded text skips special tokens, as vLLM does by default.
`min_tokens` (vLLM's semantics): at output positions t < min_tokens EOS is banned from the
selection logprobs (`sampling.ban_eos`, before top-k / top-p / Gumbel), and a stop string ends
a request only if it is completed by a token at position >= min_tokens, i.e. it ends after the
text of the first min_tokens tokens (vLLM's detokenizer checks stop strings only once
`num_output_tokens > min_tokens`, in the new text). So a "stop" output has more than
min_tokens tokens, and min_tokens = max_tokens gives exactly max_tokens ("length").
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ValidationError
from ..sampling import SamplingParams


@dataclass(frozen=True)
class GenerationRequest:
    """One request as an engine sees it: tokens in, sampling rules, the ledger-derived seed."""

    request_id: str
    prompt_ids: tuple[int, ...]
    max_tokens: int
    params: SamplingParams
    seed: int
    """The derived 64-bit sampling seed (`sampling.derive_seed`)."""
    stop: tuple[str, ...] = ()
    """Stop strings: generation ends once the decoded output contains one."""
    min_tokens: int = 0
    """No EOS or stop string can end the output before this many tokens (vLLM's min_tokens)."""


@dataclass(frozen=True, eq=False)
class Generation:
    """One request's output and its verification artifact."""

    request_id: str
    output_ids: tuple[int, ...]
    """Every sampled token, EOS included if sampled."""
    token_logprobs: np.ndarray
    """float32 (n,): raw logprob of each sampled token."""
    topk_ids: np.ndarray
    """int32 (n, k): the k most likely token ids at each position, by descending raw logprob."""
    topk_logprobs: np.ndarray
    """float32 (n, k): their raw logprobs."""
    finish_reason: str
    """"stop" (EOS or a stop string) or "length" (max_tokens)."""
    text: str
    """Decoded output: special tokens skipped, cut before a stop string."""


@dataclass(frozen=True, eq=False)
class Scoring:
    """One prefill pass over prompt + output: the raw logprobs at every output position."""

    token_logprobs: np.ndarray
    """float32 (n,): raw logprob of each given output token."""
    topk_ids: np.ndarray
    """int32 (n, k), by descending raw logprob."""
    topk_logprobs: np.ndarray
    """float32 (n, k)."""
    full_logprobs: torch.Tensor
    """float32 (n, V): the rows the verifier recomputes sampling margins from."""


class Engine(ABC):
    """A backend that samples verifiably and re-scores by prefill."""

    name: str
    """Backend name, e.g. "reference" or "vllm"."""
    version: str
    """Backend and library versions, recorded in the artifact."""
    model_hash: str
    """Content hash of the model it runs (`model.content_hash`)."""
    k: int
    """How many top logprobs it reports per position."""
    tokenizer: object
    """The model's `transformers.PreTrainedTokenizerFast`."""
    vocab_size: int
    """Width of the logprob rows (the model's logits)."""
    max_model_len: int
    """Longest prompt + output the model takes."""
    batch_hint: int = 16
    """Requests per `generate` call that keep this engine busy (the ML node's default batch)."""

    @abstractmethod
    def generate(self, requests: Sequence[GenerationRequest],
                 progress: Callable[[int], None] | None = None) -> list[Generation]:
        """Sample every request; results in request order. `progress(n)` gets new-token counts."""

    @abstractmethod
    def score(self, items: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[Scoring]:
        """For each (prompt_ids, output_ids), one prefill pass; results in input order."""

    def generate_stream(self, requests: Sequence[GenerationRequest],
                        group: int) -> Iterator[list[tuple[int, Generation]]]:
        """Generate `requests`, yielding finished ones in groups of at least `group` (the last
        may be smaller) as (index in `requests`, generation) pairs, in any order.

        The ML node checkpoints each group and checks for preemption between groups; closing
        the generator early abandons the requests not yet yielded. This default runs
        `generate` on consecutive slices of `group` requests; an engine with continuous
        batching (vLLM) overrides it to keep its batch full across groups.
        """
        if group < 1:
            raise ValueError(f"group must be >= 1, got {group}")
        for start in range(0, len(requests), group):
            gens = self.generate(requests[start:start + group])
            yield list(enumerate(gens, start))

    # --- shared helpers ---------------------------------------------------------------------

    def check_request(self, req: GenerationRequest) -> None:
        """Raise ValidationError (naming the field) for a request this engine cannot run."""
        where = f"request {req.request_id!r}"
        if not req.prompt_ids:
            raise ValidationError(f"{where}: empty prompt", field="prompt")
        bad = [t for t in req.prompt_ids
               if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.vocab_size]
        if bad:
            raise ValidationError(f"{where}: token id {bad[0]!r} is not an int in "
                                  f"[0, {self.vocab_size})", field="prompt")
        if req.max_tokens < 1:
            raise ValidationError(f"{where}: max_tokens must be >= 1, got {req.max_tokens}",
                                  field="max_tokens")
        total = len(req.prompt_ids) + req.max_tokens
        if total > self.max_model_len:
            raise ValidationError(f"{where}: prompt ({len(req.prompt_ids)} tokens) + max_tokens "
                                  f"({req.max_tokens}) = {total} exceeds the model's "
                                  f"{self.max_model_len}", field="max_tokens")
        if not 0 <= req.seed < 2**64:
            raise ValidationError(f"{where}: seed must be unsigned 64-bit", field="seed")
        if any(not s for s in req.stop):
            raise ValidationError(f"{where}: empty stop string", field="stop")
        m = req.min_tokens
        if isinstance(m, bool) or not isinstance(m, int) or not 0 <= m <= req.max_tokens:
            raise ValidationError(f"{where}: min_tokens must be an integer in [0, max_tokens = "
                                  f"{req.max_tokens}], got {m!r}", field="min_tokens")

    def check_item(self, prompt_ids: Sequence[int], output_ids: Sequence[int]) -> None:
        """Raise ValidationError for a (prompt, output) pair `score` cannot take."""
        if not prompt_ids:
            raise ValidationError("empty prompt", field="prompt")
        ids = list(prompt_ids) + list(output_ids)
        if len(ids) > self.max_model_len:
            raise ValidationError(f"prompt + output = {len(ids)} tokens exceeds the model's "
                                  f"{self.max_model_len}", field="output")
        bad = [t for t in ids
               if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.vocab_size]
        if bad:
            raise ValidationError(f"token id {bad[0]!r} is not an int in [0, {self.vocab_size})",
                                  field="output")


def generate_groups(engine: Engine, requests: Sequence[GenerationRequest],
                    group: int) -> Iterator[list[tuple[int, Generation]]]:
    """`engine.generate_stream` when the engine's class streams on its own (vLLM), else
    `engine.generate` on consecutive slices of `group`: the way the ML node drives any engine,
    wrappers that only override `generate` (tests, the pre-fill attack) included."""
    own = getattr(type(engine), "generate_stream", None)
    if own is not None and own is not Engine.generate_stream:
        return engine.generate_stream(requests, group)
    return Engine.generate_stream(engine, requests, group)  # type: ignore[arg-type]


def decode(tokenizer, ids: Sequence[int]) -> str:
    """Output text as clients see it: special tokens (EOS among them) skipped."""
    return tokenizer.decode(list(ids), skip_special_tokens=True)


def _stop_hits(text: str, stop: Sequence[str], start: int) -> list[int]:
    """Start offsets of each stop string's first occurrence that ends after `start`."""
    return [i for i in (text.find(s, max(0, start - len(s) + 1)) for s in stop) if i >= 0]


def stop_reached(text: str, stop: Sequence[str], start: int = 0) -> bool:
    """True once the decoded output contains a stop string ending after character `start`
    (`stop_start`: 0, or the length of the first min_tokens tokens' text)."""
    return bool(_stop_hits(text, stop, start))


def stop_start(tokenizer, ids: Sequence[int], min_tokens: int) -> int:
    """Where stop strings start to count: the length of the first `min_tokens` tokens' text."""
    return len(decode(tokenizer, ids[:min_tokens])) if min_tokens > 0 else 0


def ends_on_stop(tokenizer, ids: Sequence[int], stop: Sequence[str], min_tokens: int = 0) -> bool:
    """True when the last token of `ids` lets a stop string end the output (base rules)."""
    return bool(stop) and len(ids) > min_tokens and stop_reached(
        decode(tokenizer, ids), stop, stop_start(tokenizer, ids, min_tokens))


def output_text(tokenizer, ids: Sequence[int], stop: Sequence[str], min_tokens: int = 0) -> str:
    """Decoded output cut before the earliest stop string that counts (ending after the text
    of the first `min_tokens` tokens)."""
    text = decode(tokenizer, ids)
    if len(ids) <= min_tokens:
        return text
    cuts = _stop_hits(text, stop, stop_start(tokenizer, ids, min_tokens))
    return text[: min(cuts)] if cuts else text
