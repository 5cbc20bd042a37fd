"""The checks on one inference, each returning evidence (measured values, thresholds, verdict).

- Shape and range: arrays of the declared length, k columns as the network declares, token
  ids inside the vocabulary, finite logprobs. A malformed artifact fails; it never crashes the
  verifier.
- Ending: an output that ran to `max_tokens` says "length"; one that says "stop" must end on
  EOS or on the token that completed a stop string; no EOS or stop string may occur earlier
  (an executor may not sample past the end to bill more tokens), and outputs are never empty.
- Sampling margin: the verifier recomputes the logprobs by one prefill, adds the same seeded
  Gumbel noise, and measures how far the executor's token falls below the argmax at each
  position (logprob units). Honest runs give margins near 0; tokens from another model, other
  parameters, another seed or edits give large ones. A margin that cannot be computed
  (not finite) fails.
- Top-k distance: the claimed top-k logprobs against the recomputed ones, and the sampled
  token's claimed logprob against its recomputed one.

Failures are loud: a check that cannot be computed fails the inference, with its reason.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from gonka_hpc.artifacts import Inference
from gonka_hpc.engines.base import Scoring
from gonka_hpc.sampling import SamplingParams, sampling_margins

from .thresholds import Thresholds


@dataclass(frozen=True)
class InferenceEvidence:
    request_id: str
    n_tokens: int
    max_margin: float
    positions_over_margin: int
    topk_distance: float
    sampled_logprob_error: float
    passed: bool
    reasons: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {"request_id": self.request_id, "n_tokens": self.n_tokens,
                "max_margin": _finite(self.max_margin),
                "positions_over_margin": self.positions_over_margin,
                "topk_distance": _finite(self.topk_distance),
                "sampled_logprob_error": _finite(self.sampled_logprob_error),
                "passed": self.passed, "reasons": self.reasons}


def _finite(x: float) -> float | str:
    return round(float(x), 6) if np.isfinite(x) else "inf"


def _failed(inf: Inference, reasons: list[str]) -> InferenceEvidence:
    n = int(inf.output_ids.size)
    return InferenceEvidence(inf.request_id, n, float("inf"), n, float("inf"), float("inf"),
                             False, reasons)


@dataclass(frozen=True)
class Rules:
    """What the verifier knows about the model and the request, beyond the artifact."""

    eos_id: int
    vocab_size: int
    k: int
    stop: tuple[str, ...] = ()
    decode: Callable[[Sequence[int]], str] | None = None


def check_shape(inf: Inference, rules: Rules) -> list[str]:
    """Problems that make an inference unscorable (empty when it can be scored)."""
    n = int(inf.output_ids.size)
    reasons = []
    if n == 0:
        return ["empty output"]
    if inf.token_logprobs.shape != (n,) or inf.topk_ids.shape != (n, rules.k) \
            or inf.topk_logprobs.shape != (n, rules.k):
        reasons.append(f"artifact arrays do not match {n} output tokens and k={rules.k}")
        return reasons
    for name, ids in (("output", inf.output_ids), ("prompt", inf.prompt_ids),
                      ("top-k", inf.topk_ids)):
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= rules.vocab_size):
            reasons.append(f"{name} token id outside the vocabulary [0, {rules.vocab_size})")
    if not (np.all(np.isfinite(inf.token_logprobs)) and np.all(np.isfinite(inf.topk_logprobs))):
        reasons.append("non-finite logprobs")
    if n > inf.max_tokens:
        reasons.append(f"{n} output tokens exceed max_tokens {inf.max_tokens}")
    return reasons


def check_ending(inf: Inference, rules: Rules) -> list[str]:
    """The output ends where honest sampling would have stopped, and not later."""
    ids = [int(t) for t in inf.output_ids]
    n = len(ids)
    reasons = []
    if rules.eos_id in ids[:-1]:
        reasons.append(f"sampling went on past EOS at position {ids.index(rules.eos_id)}")
    if rules.stop and rules.decode is not None:
        for t in range(1, n):
            if any(s in rules.decode(ids[:t]) for s in rules.stop):
                reasons.append(f"sampling went on past a stop string at position {t - 1}")
                break
    if inf.finish_reason == "length":
        if n != inf.max_tokens:
            reasons.append(f"finish_reason 'length' with {n} of {inf.max_tokens} tokens "
                           "(truncated output)")
    elif inf.finish_reason == "stop":
        ended = ids[-1] == rules.eos_id or (
            bool(rules.stop) and rules.decode is not None
            and any(s in rules.decode(ids) for s in rules.stop))
        if not ended:
            reasons.append("finish_reason 'stop' but the output ends on neither EOS nor a "
                           "stop string (truncated output)")
    else:
        reasons.append(f"unknown finish_reason {inf.finish_reason!r}")
    return reasons


def check_inference(inf: Inference, scoring: Scoring, th: Thresholds,
                    rules: Rules) -> InferenceEvidence:
    n = int(inf.output_ids.size)
    reasons = check_shape(inf, rules)
    if reasons:
        return _failed(inf, reasons)
    reasons = check_ending(inf, rules)
    full = scoring.full_logprobs
    params = SamplingParams(inf.temperature, inf.top_p, inf.top_k)
    margins = sampling_margins(full, [int(t) for t in inf.output_ids], inf.seed, params,
                               lp_slack=th.lp_slack, mass_slack=th.mass_slack)
    margins = np.where(np.isfinite(margins), margins, np.inf)
    full_np = full.double().numpy() if hasattr(full, "numpy") else np.asarray(full, float)
    rows = np.arange(n)
    sampled_err = float(np.max(np.abs(inf.token_logprobs.astype(np.float64)
                                      - full_np[rows, inf.output_ids])))
    topk_dist = float(np.max(np.abs(inf.topk_logprobs.astype(np.float64)
                                    - full_np[rows[:, None], inf.topk_ids])))
    max_margin = float(np.max(margins))
    over = int(np.sum(margins > th.sampling_margin))
    if over:
        reasons.append(f"sampling margin {_finite(max_margin)} > {th.sampling_margin} at "
                       f"{over} of {n} positions")
    if not topk_dist <= th.topk_distance:
        reasons.append(f"top-k distance {topk_dist:.4g} > {th.topk_distance}")
    if not sampled_err <= th.sampled_logprob:
        reasons.append(f"sampled-token logprob error {sampled_err:.4g} > {th.sampled_logprob}")
    return InferenceEvidence(inf.request_id, n, max_margin, over, topk_dist, sampled_err,
                             not reasons, reasons)
