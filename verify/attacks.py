"""The attack suite: every known way to be paid for inference not done honestly, made for real.

Each attack takes the requests an executor was assigned (and, where the cheat edits honest work,
the honest artifacts) and returns the artifacts a cheater would submit, claiming the real
model's hash, the assigned sampling parameters and the ledger-derived seed. All are built with
the project's own tools on the local model:

| attack | what the cheater does |
|---|---|
| `smaller_model` | generates with gonka-tiny-small (same tokenizer) and reports its logprobs |
| `prefill` | generates with gonka-tiny-small, reports the real model's logprobs (one prefill) |
| `int8`, `int4` | runs a weight-quantized copy of the real model (`verify.quantize`) |
| `bf16` | runs the real model in bfloat16 where the network declared float32 |
| `temperature` | samples at another temperature |
| `top_p` | samples with another nucleus (1.0 instead of < 1, 0.8 instead of 1) |
| `seed` | samples with another seed |
| `edit1` | edits one token at a random position to another top-k token, then reports the
               real model's logprobs for the edited text (one prefill) |
| `logprob_noise` | honest tokens, logprobs with Gaussian noise (sigma `NOISE_SIGMA`) |
| `replay` | resubmits the output of the same prompt from another epoch (another block's seed) |
| `truncated` | drops the last quarter of the output and bills it as complete |

Where the assigned sampling cannot differ (e.g. another seed or top_p at T = 0) an attack may
reproduce the honest output exactly: such outputs are correct work and are reported apart
(`identical`). The replay of an artifact under its original request id or seed is caught by
binding (`verify.binding`), before any re-scoring.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from gonka_hpc.artifacts import Inference
from gonka_hpc.engines.base import Engine, Generation, GenerationRequest
from gonka_hpc.engines.prefill_attack import PrefillAttackEngine
from gonka_hpc.engines.reference import ReferenceEngine
from gonka_hpc.model import ensure_model
from gonka_hpc.sampling import SamplingParams, derive_seed

from .quantize import quantize_model_

ATTACKS = ("smaller_model", "prefill", "int8", "int4", "bf16", "temperature", "top_p", "seed",
           "edit1", "logprob_noise", "replay", "truncated")
CHEAP_MODEL = "gonka-tiny-small"
NOISE_SIGMA = 0.1
"""Standard deviation of the noise the `logprob_noise` cheat adds (logprob units)."""
OTHER_EPOCH_BLOCK = "0e" * 32
"""The block hash of the earlier epoch whose outputs `replay` resubmits."""


def inference_of(req: GenerationRequest, gen: Generation) -> Inference:
    """The artifact record of one generation, claiming the request's own seed and parameters."""
    return Inference(req.request_id, np.asarray(req.prompt_ids, np.int32),
                     np.asarray(gen.output_ids, np.int32), gen.token_logprobs, gen.topk_ids,
                     gen.topk_logprobs, req.seed, req.params.temperature, req.params.top_p,
                     req.params.top_k, req.max_tokens, gen.finish_reason, req.min_tokens)


def prefix(inf: Inference, n: int) -> Inference:
    """The artifact the same request would have given with max_tokens = n (sampling is causal;
    min_tokens is capped at n, which bans EOS at the same positions)."""
    m = min(inf.min_tokens, n)
    if inf.output_ids.size <= n:
        return replace(inf, max_tokens=n, min_tokens=m)
    return replace(inf, output_ids=inf.output_ids[:n], token_logprobs=inf.token_logprobs[:n],
                   topk_ids=inf.topk_ids[:n], topk_logprobs=inf.topk_logprobs[:n],
                   max_tokens=n, min_tokens=m, finish_reason="length")


def _claim(reqs: Sequence[GenerationRequest], gens: Sequence[Generation]) -> list[Inference]:
    return [inference_of(r, g) for r, g in zip(reqs, gens, strict=True)]


def other_temperature(t: float) -> float:
    return t + 0.5 if t < 1.0 else t - 0.5


def other_top_p(p: float) -> float:
    return 1.0 if p < 1.0 else 0.8


@dataclass
class AttackSuite:
    """Builds each cheater's engine once (lazily) and produces its artifacts."""

    real: ReferenceEngine
    """The honest engine on the network model (fp32): used for prefill-based cheats."""
    data_dir: Path | None = None
    seed: int = 0
    """Seeds the random choices of `edit1` and `logprob_noise`."""

    def __post_init__(self) -> None:
        self._engines: dict[str, Engine] = {}

    def engine(self, name: str) -> Engine:
        """The cheater's engine for `name` (smaller model, quantized or bf16 copy)."""
        if name in self._engines:
            return self._engines[name]
        real = self.real
        eng: Engine
        if name == "small":
            info = ensure_model(CHEAP_MODEL, self.data_dir, progress=False)
            eng = ReferenceEngine(info.path, k=real.k, max_batch_size=real.max_batch_size,
                                  model_hash=real.model_hash)
        elif name in ("int8", "int4"):
            q = ReferenceEngine(real.model_dir, k=real.k, max_batch_size=real.max_batch_size,
                                model_hash=real.model_hash)
            quantize_model_(q.model, name)
            eng = q
        elif name == "bf16":
            eng = ReferenceEngine(real.model_dir, k=real.k, dtype="bfloat16",
                                  max_batch_size=real.max_batch_size, model_hash=real.model_hash)
        else:
            raise ValueError(f"no cheater engine named {name!r}")
        self._engines[name] = eng
        return eng

    def run(self, attack: str, reqs: Sequence[GenerationRequest],
            honest: Sequence[Inference]) -> list[Inference]:
        """The artifacts the `attack` cheater submits for `reqs` (honest: the real ones)."""
        if attack not in ATTACKS:
            raise ValueError(f"unknown attack {attack!r}; known: {', '.join(ATTACKS)}")
        reqs = list(reqs)
        rng = random.Random(f"{self.seed}:{attack}")
        if attack == "smaller_model":
            return _claim(reqs, self.engine("small").generate(reqs))
        if attack == "prefill":
            cheat = PrefillAttackEngine(cheap=self.engine("small"), real=self.real)
            return _claim(reqs, cheat.generate(reqs))
        if attack in ("int8", "int4", "bf16"):
            return _claim(reqs, self.engine(attack).generate(reqs))
        if attack in ("temperature", "top_p", "seed", "replay"):
            run = [self._altered(attack, r) for r in reqs]
            return _claim(reqs, self.real.generate(run))
        if attack == "edit1":
            return self.edit_one(list(honest), rng)
        if attack == "logprob_noise":
            np_rng = np.random.default_rng(rng.getrandbits(32))
            return [replace(i, token_logprobs=(i.token_logprobs + np_rng.normal(
                0, NOISE_SIGMA, i.token_logprobs.shape)).astype(np.float32),
                topk_logprobs=(i.topk_logprobs + np_rng.normal(
                    0, NOISE_SIGMA, i.topk_logprobs.shape)).astype(np.float32))
                for i in honest]
        return [truncate(i) for i in honest]  # truncated

    @staticmethod
    def _altered(attack: str, r: GenerationRequest) -> GenerationRequest:
        p = r.params
        if attack == "temperature":
            return replace(r, params=SamplingParams(other_temperature(p.temperature), p.top_p,
                                                    p.top_k))
        if attack == "top_p":
            return replace(r, params=SamplingParams(p.temperature, other_top_p(p.top_p), p.top_k))
        if attack == "seed":
            return replace(r, seed=r.seed ^ 0x5EED_5EED_5EED_5EED)
        return replace(r, seed=derive_seed(OTHER_EPOCH_BLOCK, r.request_id, None))  # replay

    def edit_one(self, honest: list[Inference], rng: random.Random,
                 within: int | None = None) -> list[Inference]:
        """One token per output replaced (at a random position < `within`) by another top-k
        token, with the real model's logprobs for the edited text (the attacker re-scores)."""
        edited = []
        for inf in honest:
            out = inf.output_ids.copy()
            n = min(out.size, within or out.size)
            pos = rng.randrange(n)
            others = [int(t) for t in inf.topk_ids[pos] if int(t) != int(out[pos])]
            out[pos] = rng.choice(others) if others else (int(out[pos]) + 1) % self.real.vocab_size
            edited.append(replace(inf, output_ids=out))
        scores = self.real.score([(i.prompt_ids.tolist(), i.output_ids.tolist())
                                  for i in edited])
        return [replace(i, token_logprobs=s.token_logprobs, topk_ids=s.topk_ids,
                        topk_logprobs=s.topk_logprobs) for i, s in zip(edited, scores)]


def truncate(inf: Inference) -> Inference:
    """Drop the last quarter of the output (at least one token), billing it as complete."""
    n = int(inf.output_ids.size)
    keep = max(1, n - max(1, n // 4))
    if keep >= n:
        return inf
    return replace(inf, output_ids=inf.output_ids[:keep],
                   token_logprobs=inf.token_logprobs[:keep], topk_ids=inf.topk_ids[:keep],
                   topk_logprobs=inf.topk_logprobs[:keep])


def set_threads(n: int) -> int:
    """Set torch's intra-op threads; returns the previous count (for the honest-noise runs)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(n)
    return prev
