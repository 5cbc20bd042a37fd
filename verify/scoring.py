"""The checks on one inference, each returning evidence (measured values, thresholds, verdict).

- Sampling margin: the verifier recomputes the logprobs by one prefill, adds the same seeded
  Gumbel noise, and measures how far the executor's token falls below the argmax at each
  position (logprob units). Honest runs give margins near 0; tokens from another model, other
  parameters, another seed or edits give large ones.
- Top-k distance: the claimed top-k logprobs against the recomputed ones, and the sampled
  token's claimed logprob against its recomputed one.
- Shape: arrays of the declared length; an output cut short of `max_tokens` must end on EOS or a
  stop string.

Failures are loud: a check that cannot be computed fails the inference, with its reason.
"""

from __future__ import annotations

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


def check_inference(inf: Inference, scoring: Scoring, th: Thresholds) -> InferenceEvidence:
    n = int(inf.output_ids.size)
    reasons: list[str] = []
    k = inf.topk_ids.shape[1] if inf.topk_ids.ndim == 2 else 0
    if inf.token_logprobs.shape != (n,) or inf.topk_ids.shape != (n, k) \
            or inf.topk_logprobs.shape != (n, k):
        reasons.append("artifact arrays do not match the output length")
    if n > inf.max_tokens:
        reasons.append(f"{n} output tokens exceed max_tokens {inf.max_tokens}")
    if inf.finish_reason == "length" and n != inf.max_tokens:
        reasons.append(f"finish_reason 'length' with {n} of {inf.max_tokens} tokens "
                       "(truncated output)")
    if reasons:
        return InferenceEvidence(inf.request_id, n, float("inf"), n, float("inf"),
                                 float("inf"), False, reasons)
    full = scoring.full_logprobs
    params = SamplingParams(inf.temperature, inf.top_p, inf.top_k)
    margins = sampling_margins(full, [int(t) for t in inf.output_ids], inf.seed, params,
                               lp_slack=th.lp_slack, mass_slack=th.mass_slack) \
        if n else np.zeros(0)
    full_np = full.double().numpy() if hasattr(full, "numpy") else np.asarray(full, float)
    rows = np.arange(n)
    sampled_err = float(np.max(np.abs(inf.token_logprobs.astype(np.float64)
                                      - full_np[rows, inf.output_ids]))) if n else 0.0
    topk_dist = float(np.max(np.abs(inf.topk_logprobs.astype(np.float64)
                                    - full_np[rows[:, None], inf.topk_ids]))) if n and k else 0.0
    max_margin = float(np.max(margins)) if n else 0.0
    over = int(np.sum(margins > th.sampling_margin))
    if over:
        reasons.append(f"sampling margin {_finite(max_margin)} > {th.sampling_margin} at "
                       f"{over} of {n} positions")
    if topk_dist > th.topk_distance:
        reasons.append(f"top-k distance {topk_dist:.4g} > {th.topk_distance}")
    if sampled_err > th.sampled_logprob:
        reasons.append(f"sampled-token logprob error {sampled_err:.4g} > {th.sampled_logprob}")
    return InferenceEvidence(inf.request_id, n, max_margin, over, topk_dist, sampled_err,
                             not reasons, reasons)
