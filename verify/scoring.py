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
  token's claimed logprob against its recomputed one; the claimed ids must be distinct and be
  the top k (none more than the tolerance below the recomputed k-th logprob).
- The statistical decision (`verify.statistics.decide`): one test over all positions' margins,
  with a hard bound per position and a count rule whose false-positive rate is at most `alpha`
  per inference at any length; its p-value and the count needed to fail at this length are part
  of the evidence, so a short output says how much it could show.

`measure` computes the per-position quantities once (the calibration re-applies thresholds to
them); `judge` applies one precision class's thresholds; `check_inference` does both.
Failures are loud: a check that cannot be computed fails the inference, with its reason.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from gonka_hpc.artifacts import Inference
from gonka_hpc.engines.base import Scoring, stop_reached
from gonka_hpc.sampling import (
    SamplingParams,
    ban_eos,
    gumbel_rows,
    margins_of_rows,
    sampling_margins,
)

from .statistics import MarginDecision, decide
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
    decision: MarginDecision | None = None
    """The statistical test's measurements and verdict (None when the artifact was unscorable)."""
    thresholds: dict = field(default_factory=dict)
    """The thresholds used (`Thresholds.used()`)."""

    def summary(self) -> dict:
        out = {"request_id": self.request_id, "n_tokens": self.n_tokens,
               "max_margin": _finite(self.max_margin),
               "positions_over_margin": self.positions_over_margin,
               "topk_distance": _finite(self.topk_distance),
               "sampled_logprob_error": _finite(self.sampled_logprob_error),
               "passed": self.passed, "reasons": self.reasons}
        if self.decision is not None:
            out["p_value"] = self.decision.summary()["p_value"]
            out["positions_over_floor"] = self.decision.over_floor
            out["critical_count"] = self.decision.critical_count
        return out


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
    if not 0 <= inf.min_tokens <= inf.max_tokens:
        reasons.append(f"min_tokens {inf.min_tokens} outside [0, max_tokens {inf.max_tokens}]")
    return reasons


def check_ending(inf: Inference, rules: Rules) -> list[str]:
    """The output ends where honest sampling would have stopped, and not later; and not
    earlier than `min_tokens` allows: no EOS at a position < min_tokens, and a stop string
    counts only when completed by a token at position >= min_tokens (it ends after the text
    of the first min_tokens tokens), so a "stop" output has more than min_tokens tokens."""
    ids = [int(t) for t in inf.output_ids]
    n = len(ids)
    m = int(inf.min_tokens)
    reasons = []
    if rules.eos_id in ids[:-1]:
        reasons.append(f"sampling went on past EOS at position {ids.index(rules.eos_id)}")
    if rules.eos_id in ids[:m]:
        reasons.append(f"EOS at position {ids.index(rules.eos_id)}, before min_tokens {m} "
                       "(min_tokens ignored)")
    decode = rules.decode
    # stop strings count once they end after the text of the first min_tokens tokens
    start = len(decode(ids[:m])) if rules.stop and decode is not None and m > 0 else 0
    if rules.stop and decode is not None:
        for t in range(m + 1, n):
            if stop_reached(decode(ids[:t]), rules.stop, start):
                reasons.append(f"sampling went on past a stop string at position {t - 1}")
                break
    if inf.finish_reason == "length":
        if n != inf.max_tokens:
            reasons.append(f"finish_reason 'length' with {n} of {inf.max_tokens} tokens "
                           "(truncated output)")
    elif inf.finish_reason == "stop":
        if n <= m:
            reasons.append(f"finish_reason 'stop' with {n} tokens, not more than min_tokens "
                           f"{m} (min_tokens ignored)")
        ended = ids[-1] == rules.eos_id or (
            bool(rules.stop) and decode is not None
            and stop_reached(decode(ids), rules.stop, start))
        if not ended:
            reasons.append("finish_reason 'stop' but the output ends on neither EOS nor a "
                           "stop string (truncated output)")
    else:
        reasons.append(f"unknown finish_reason {inf.finish_reason!r}")
    return reasons


@dataclass(frozen=True, eq=False)
class Measurements:
    """Per-position quantities of one scored inference, before any threshold is applied."""

    margins: np.ndarray
    """float64 (n,): sampling margin per position (inf where the token is not allowed)."""
    topk_errors: np.ndarray
    """float64 (n,): max |claimed - recomputed| over the claimed top-k ids, per position, or how
    far the lowest claimed id falls below the recomputed k-th logprob (a wrong top-k set)."""
    sampled_errors: np.ndarray
    """float64 (n,): |claimed - recomputed| logprob of the sampled token, per position."""

    def prefix(self, n: int) -> Measurements:
        return Measurements(self.margins[:n], self.topk_errors[:n], self.sampled_errors[:n])


def margins(logprobs: torch.Tensor, chosen: Sequence[int], seed: int, params: SamplingParams,
            lp_slack: float, mass_slack: float) -> np.ndarray:
    """`gonka_hpc.sampling.sampling_margins`, with a fast path for the common position.

    Where the chosen token is both the most likely one (always allowed) and the argmax of the
    noisy scores over the whole vocabulary, its margin is exactly 0 and the two nucleus masks
    need not be built; every other position takes the reference computation, all of them in
    one batched call (`margins_of_rows`).
    tests/test_verify_statistics.py checks equality with `sampling_margins`.
    """
    lp = logprobs.detach().to(torch.float64)
    n, vocab = lp.shape
    if params.greedy or n == 0:
        return sampling_margins(lp, chosen, seed, params, lp_slack, mass_slack)
    ids = torch.as_tensor(list(chosen), dtype=torch.int64)
    if bool(((ids < 0) | (ids >= vocab)).any()):
        raise ValueError(f"chosen token ids must be in [0, {vocab})")
    t = params.temperature
    score = lp / t + gumbel_rows([seed] * n, list(range(n)), vocab)
    best = ids == score.argmax(dim=1)
    easy = best & (ids == lp.argmax(dim=1))
    out = np.zeros(n, dtype=np.float64)
    hard = torch.nonzero(~easy).flatten()
    if hard.numel():
        out[hard.numpy()] = margins_of_rows(lp[hard], ids[hard], score[hard], t, params, lp_slack,
                                            mass_slack).numpy()
    return out


def measure(inf: Inference, scoring: Scoring, lp_slack: float,
            mass_slack: float, eos_id: int | None = None) -> Measurements:
    """Margins and logprob errors at every position (the artifact must pass `check_shape`).

    With `min_tokens`, the margins are measured on the selection logprobs (EOS banned below
    min_tokens, `sampling.ban_eos`; `eos_id` is then required), the logprob distances on the
    raw ones the executor reports."""
    n = int(inf.output_ids.size)
    full = scoring.full_logprobs
    params = SamplingParams(inf.temperature, inf.top_p, inf.top_k)
    sel = full
    if inf.min_tokens > 0:
        if eos_id is None:
            raise ValueError(f"{inf.request_id}: min_tokens {inf.min_tokens} needs the EOS id "
                             "to measure margins")
        sel = ban_eos(torch.as_tensor(full), list(range(n)), int(inf.min_tokens), eos_id)
    m = margins(sel, [int(t) for t in inf.output_ids], inf.seed, params, lp_slack,
                mass_slack)
    m = np.where(np.isfinite(m), m, np.inf)
    # gathers on the verifier's float32 logprobs, widened after (the same float64 values)
    full_t = torch.as_tensor(full)
    ids_t = torch.as_tensor(inf.output_ids, dtype=torch.int64)
    rows_t = torch.arange(n)
    sampled = np.abs(inf.token_logprobs.astype(np.float64)
                     - full_t[rows_t, ids_t].double().numpy())
    topk_ids = torch.as_tensor(inf.topk_ids, dtype=torch.int64)
    claimed = full_t.gather(1, topk_ids).double().numpy()  # recomputed logprobs of claimed ids
    topk = np.abs(inf.topk_logprobs.astype(np.float64) - claimed).max(axis=1)
    # the claimed ids must be the top k: none may fall below the recomputed k-th largest
    k = int(inf.topk_ids.shape[1])
    kth = torch.topk(full_t, k, dim=1).values[:, -1].double().numpy()
    rank = np.maximum(0.0, kth - claimed.min(axis=1))
    return Measurements(m, np.maximum(topk, rank), sampled)


def judge(request_id: str, m: Measurements, th: Thresholds,
          reasons: Sequence[str] = ()) -> InferenceEvidence:
    """Apply one precision class's thresholds; `reasons` are failures found before scoring."""
    reasons = list(reasons)
    n = int(m.margins.size)
    d = decide(m.margins, th.margin_test)
    topk_dist = float(np.max(m.topk_errors)) if n else 0.0
    sampled_err = float(np.max(m.sampled_errors)) if n else 0.0
    if d.over_max:
        reasons.append(f"sampling margin {_finite(d.max_margin)} > {th.sampling_margin} at "
                       f"{d.over_max} of {n} positions")
    elif not d.passed:
        reasons.append(f"sampling margins over the noise floor {th.margin_floor} at "
                       f"{d.over_floor} of {n} positions (p = {d.p_value:.2g} < "
                       f"alpha {th.alpha:g})")
    if not topk_dist <= th.topk_distance:
        reasons.append(f"top-k distance {topk_dist:.4g} > {th.topk_distance}")
    if not sampled_err <= th.sampled_logprob:
        reasons.append(f"sampled-token logprob error {sampled_err:.4g} > {th.sampled_logprob}")
    return InferenceEvidence(request_id, n, d.max_margin, d.over_max, topk_dist, sampled_err,
                             not reasons, reasons, d, th.used())


def check_inference(inf: Inference, scoring: Scoring, th: Thresholds,
                    rules: Rules) -> InferenceEvidence:
    """Every check on one inference: shape, ending, margins (the test), logprob distances."""
    reasons = check_shape(inf, rules)
    if reasons:
        return _failed(inf, reasons)
    reasons = check_ending(inf, rules)
    srt = np.sort(inf.topk_ids, axis=1)
    if np.any(srt[:, 1:] == srt[:, :-1]):
        reasons.append("top-k ids repeat within a position")
    m = measure(inf, scoring, th.lp_slack, th.mass_slack, rules.eos_id)
    return judge(inf.request_id, m, th, reasons)
