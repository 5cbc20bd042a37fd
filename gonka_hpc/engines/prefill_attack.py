"""The pre-fill attack, as an engine: for demos, tests and the attack suite only.

It generates with a cheap model, then re-scores the output with the real model in one prefill
and reports the real model's logprobs and hash. Gonka's launch check (top-k logprobs only)
caught this 0% of the time; our seeded sampling margin catches it, because the cheap model's
tokens are not the argmax of the real logprobs plus the seeded noise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

from .base import Engine, Generation, GenerationRequest, Scoring


class PrefillAttackEngine(Engine):
    def __init__(self, *, cheap: Engine, real: Engine) -> None:
        self.cheap, self.real = cheap, real
        self.name, self.version, self.model_hash = real.name, real.version, real.model_hash
        self.k, self.tokenizer, self.vocab_size = real.k, real.tokenizer, real.vocab_size
        self.max_model_len = min(real.max_model_len, cheap.max_model_len)

    def generate(self, requests: Sequence[GenerationRequest],
                 progress: Callable[[int], None] | None = None) -> list[Generation]:
        gens = self.cheap.generate(requests, progress)
        scores = self.real.score([(r.prompt_ids, g.output_ids) for r, g in zip(requests, gens)])
        return [replace(g, token_logprobs=s.token_logprobs, topk_ids=s.topk_ids,
                        topk_logprobs=s.topk_logprobs) for g, s in zip(gens, scores)]

    def score(self, items: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[Scoring]:
        return self.real.score(items)
