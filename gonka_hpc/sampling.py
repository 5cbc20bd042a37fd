"""Seeded, verifiable sampling (DESIGN.md, "Verifiable sampling").

Every token choice is a pure function of the model's raw logprobs and a 64-bit seed derived
from the ledger, so a verifier that recomputes the logprobs by one prefill pass can check each
choice:

- `derive_seed` binds a request's seed to a finalized block hash, its id and the client's seed.
- `hash32` / `hash32_py` are a counter-based hash of (seed, output position, token id): four
  rounds of the MurmurHash3 32-bit finalizer, with every 32-bit multiply split into 16-bit
  halves so no int64 intermediate overflows. Pure integer arithmetic: identical in torch (any
  thread count, CPU or GPU) and in Python ints.
- `gumbel` turns the hash into Gumbel(0, 1) noise, `-log(-log((h + 0.5) / 2**32))` in float64.
- `select_token` picks `argmax(logprob / T + g)` over the tokens that survive top-k and top-p:
  an exact sample from the tempered, truncated softmax (Gumbel-max); T = 0 is greedy.
- `sampling_margins` is the verifier's side: how far (in logprob units) the executor's token
  falls below the best allowed one. Honest fp32 runs give margins of exactly 0.

Filtering order follows vLLM: temperature, then top-k on rank, then top-p on the softmax of the
survivors (renormalized), in float64. Limits: the nucleus boundary is inherently fragile under
numerical noise; the verifier must use the tolerant form (`lp_slack`, `mass_slack`), see
VERIFICATION-NOTES.md. Margins measure one position; the statistical test lives in `verify/`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .canonical import canonical_bytes

SEED_VERSION = 1
MASK32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9  # starting state; fmix32(0) == 0, so never start from 0
_C1 = 0x85EBCA6B
_C2 = 0xC2B2AE35

DEFAULT_LP_SLACK = 0.1
"""Verifier's tolerance on the top-k / top-p boundary, in logprob units times 1/T."""
DEFAULT_MASS_SLACK = 0.02
"""Verifier's tolerance on the nucleus prefix mass."""


# --- seeds ----------------------------------------------------------------------------------


def derive_seed(block_hash: str, request_id: str, client_seed: int | None) -> int:
    """The request's 64-bit unsigned sampling seed, bound to a finalized block and the request."""
    payload = {"v": SEED_VERSION, "block": block_hash, "request": request_id, "seed": client_seed}
    digest = hashlib.sha256(canonical_bytes(payload)).digest()
    return int.from_bytes(digest[:8], "little")


def _check_seed(seed: int) -> None:
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an unsigned 64-bit integer, got {seed}")


# --- counter-based hash ---------------------------------------------------------------------


def _mul32_py(a: int, c: int) -> int:
    a_lo, a_hi = a & 0xFFFF, a >> 16
    c_lo, c_hi = c & 0xFFFF, c >> 16
    return (a_lo * c_lo + (((a_hi * c_lo + a_lo * c_hi) & 0xFFFF) << 16)) & MASK32


def _fmix32_py(h: int) -> int:
    h ^= h >> 16
    h = _mul32_py(h, _C1)
    h ^= h >> 13
    h = _mul32_py(h, _C2)
    h ^= h >> 16
    return h


def _prefix_py(seed: int, position: int) -> int:
    """State after folding in seed low, seed high and position (the first three rounds)."""
    _check_seed(seed)
    if not 0 <= position <= MASK32:
        raise ValueError(f"position must fit in 32 bits, got {position}")
    h = _fmix32_py(_GOLDEN ^ (seed & MASK32))
    h = _fmix32_py(h ^ (seed >> 32))
    return _fmix32_py(h ^ position)


def hash32_py(seed: int, position: int, token_id: int) -> int:
    """The counter-based hash in plain Python ints (the reference the torch version must match)."""
    if not 0 <= token_id <= MASK32:
        raise ValueError(f"token_id must fit in 32 bits, got {token_id}")
    return _fmix32_py(_prefix_py(seed, position) ^ token_id)


def _mul32_t(a: torch.Tensor, c: int) -> torch.Tensor:
    # (a * c) mod 2**32 for a, c < 2**32 with every product < 2**48: split c only (two
    # products instead of _mul32_py's three); the same integer as _mul32_py, bit for bit.
    c_lo, c_hi = c & 0xFFFF, c >> 16
    hi = (a * c_hi).bitwise_and_(0xFFFF).bitwise_left_shift_(16)
    return hi.add_(a * c_lo).bitwise_and_(MASK32)


def _fmix32_t(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul32_t(h, _C1)
    h ^= h >> 13
    h = _mul32_t(h, _C2)
    return h.bitwise_xor_(h >> 16)


def hash32(seed: int, position: int, token_ids: torch.Tensor) -> torch.Tensor:
    """The hash for every id in `token_ids` (int64 tensor of uint32 values); int64 result."""
    ids = torch.as_tensor(token_ids, dtype=torch.int64)
    return _fmix32_t(ids ^ _prefix_py(seed, position))


def _hash_rows(seeds: Sequence[int], positions: Sequence[int], vocab_size: int,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """(B, V) hashes, row b for (seeds[b], positions[b]) over token ids 0..V-1."""
    prefix = torch.tensor([_prefix_py(s, p) for s, p in zip(seeds, positions, strict=True)],
                          dtype=torch.int64, device=device)
    ids = torch.arange(vocab_size, dtype=torch.int64, device=device)
    return _fmix32_t(prefix[:, None] ^ ids[None, :])


def _to_gumbel(h: torch.Tensor) -> torch.Tensor:
    u = (h.to(torch.float64) + 0.5) / 2.0**32
    return -torch.log(-torch.log(u))


def gumbel(seed: int, position: int, vocab_size: int) -> torch.Tensor:
    """Gumbel(0, 1) noise for output `position`, one value per token id; float64 (V,)."""
    return _to_gumbel(hash32(seed, position, torch.arange(vocab_size, dtype=torch.int64)))


def gumbel_rows(seeds: Sequence[int], positions: Sequence[int], vocab_size: int,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """Gumbel noise for several (seed, position) pairs at once; float64 (B, V)."""
    return _to_gumbel(_hash_rows(seeds, positions, vocab_size, device))


# --- parameters -----------------------------------------------------------------------------


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples. Validated on construction (ValueError names the field)."""

    temperature: float = 1.0
    """Softmax temperature, >= 0; 0 means greedy."""
    top_p: float = 1.0
    """Nucleus mass, in (0, 1]; 1 turns the nucleus step off."""
    top_k: int = 0
    """Keep the k most likely tokens, >= 0; 0 turns top-k off."""

    def __post_init__(self) -> None:
        t, p, k = self.temperature, self.top_p, self.top_k
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {t!r}")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {p!r}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {k!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


# --- filtering and selection ----------------------------------------------------------------


def _above(values: torch.Tensor, tol: float) -> torch.Tensor:
    """For values sorted descending: how many other entries rank above each one.

    tol > 0: entries more than `tol` above it (near-ties count as below: widening).
    tol < 0: entries at least `tol` below it or higher, itself excluded (narrowing).
    tol == 0: its index in the (stable) sorted order (the engine's exact ranking).
    """
    n = values.shape[0]
    if tol == 0:
        return torch.arange(n, device=values.device)
    neg = (-values).contiguous()  # ascending
    if tol > 0:
        return torch.searchsorted(neg, -(values + tol), right=False)
    return torch.searchsorted(neg, -(values + tol), right=True) - 1


def allowed_mask(logprobs: torch.Tensor, params: SamplingParams, lp_slack: float = 0.0,
                 mass_slack: float = 0.0) -> torch.Tensor:
    """Tokens that top-k and top-p allow, as a bool (V,) tensor.

    With zero slack this is the engine's exact set: rank (stable, ties to the lower id) < k,
    and the smallest prefix of the top-k survivors, sorted by logprob, whose tempered and
    renormalized probability reaches `top_p` (a token is kept if the mass before it is
    < top_p). Positive slack widens the set (the verifier's "could an honest engine have
    allowed this?"): tokens within `lp_slack / T` of a token count as tied with it, never as
    above it, and the mass limit is `top_p + mass_slack`. Negative slack narrows it (tokens every
    honest engine surely allows): near-ties count as above, and the limit is `top_p - |slack|`.
    The most likely token is always allowed. At T = 0 only the argmax is (or, with positive
    `lp_slack`, every token within `lp_slack` of it).
    """
    lp = logprobs.detach().to(torch.float64)
    if lp.dim() != 1:
        raise ValueError(f"logprobs must be (V,), got shape {tuple(lp.shape)}")
    vocab = lp.shape[0]
    top = int(torch.argmax(lp))
    t = params.temperature
    if t == 0:
        mask = lp >= lp[top] - max(lp_slack, 0.0)
        mask[top] = True
        return mask
    if params.top_k in (0, vocab) and params.top_p == 1:
        return torch.ones(vocab, dtype=torch.bool, device=lp.device)
    tol = lp_slack / t
    order = torch.argsort(lp, descending=True, stable=True)
    values = lp[order]
    above = _above(values, tol)
    keep = torch.ones(vocab, dtype=torch.bool, device=lp.device)  # in sorted order
    if 0 < params.top_k < vocab:
        keep &= above < params.top_k
    if params.top_p < 1:
        # Survivors of top-k are a prefix of the sorted order when tol >= 0; in general, zero
        # the probability of every token top-k dropped before renormalizing.
        scaled = torch.where(keep, values / t, torch.full_like(values, -math.inf))
        probs = torch.softmax(scaled, dim=0)
        cum = torch.cumsum(probs, dim=0)
        if tol < 0:  # the prefix counted is `above + 1` long and holds the token itself
            prefix_mass = cum[above] - probs
        else:
            prefix_mass = torch.where(above > 0, cum[(above - 1).clamp(min=0)],
                                      torch.zeros_like(cum))
        limit = params.top_p + mass_slack
        keep &= (prefix_mass <= limit) if mass_slack > 0 else (prefix_mass < limit)
    mask = torch.zeros(vocab, dtype=torch.bool, device=lp.device)
    mask[order] = keep
    mask[top] = True
    return mask


def select_token(logprobs: torch.Tensor, seed: int, position: int,
                 params: SamplingParams) -> int:
    """The token the engine must emit at output `position` (0-based) given raw logprobs (V,)."""
    lp = logprobs.detach().to(torch.float64)
    if params.greedy:
        return int(torch.argmax(lp))  # first maximum: ties go to the lowest id
    mask = allowed_mask(lp, params)
    score = lp / params.temperature + gumbel(seed, position, lp.shape[0]).to(lp.device)
    return int(torch.argmax(torch.where(mask, score, torch.full_like(score, -math.inf))))


def _stable_top_k(values: torch.Tensor, ks: torch.Tensor) -> torch.Tensor:
    """Bool (R, V): rank < ks[r] in the stable descending order of each row (ties to the lower
    id), without a sort: above the k-th value, or tied with it and early enough."""
    kth = torch.topk(values, int(ks.max()), dim=1).values.gather(1, (ks - 1)[:, None])
    above = values > kth
    tied = values == kth
    room = ks[:, None] - above.sum(dim=1, keepdim=True)
    return above | (tied & (torch.cumsum(tied, dim=1) <= room))


def allowed_masks(logprobs: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """`allowed_mask` (zero slack: the engine's exact sets) for every row of (B, V) logprobs.

    Batched in torch for an engine's decode step, with the same sets as `allowed_mask` row by
    row (tests/test_sampling.py checks it on random rows with ties). Top-k needs no sort
    (`_stable_top_k`); a nucleus row with top-k sorts only its k survivors (the rest are -inf
    in `allowed_mask`'s softmax input too, so that input is the same tensor); a nucleus row
    without top-k sorts its whole row once, as `allowed_mask` does.
    """
    lp = logprobs.detach().to(torch.float64)
    if lp.dim() != 2 or lp.shape[0] != len(params):
        raise ValueError(f"logprobs must be (B, V) with B = len(params) = {len(params)}, "
                         f"got shape {tuple(lp.shape)}")
    rows, vocab = lp.shape
    dev = lp.device
    mask = torch.ones((rows, vocab), dtype=torch.bool, device=dev)
    greedy = [b for b in range(rows) if params[b].greedy]
    if greedy:  # the maximum and any exact ties with it
        g = torch.tensor(greedy, dtype=torch.int64, device=dev)
        mask[g] = lp[g] >= lp[g].max(dim=1, keepdim=True).values

    def idx(bs: list[int]) -> torch.Tensor:
        return torch.tensor(bs, dtype=torch.int64, device=dev)

    sampled = [b for b in range(rows) if not params[b].greedy]
    top_k = [b for b in sampled if 0 < params[b].top_k < vocab]
    short: list[int] = []  # nucleus rows whose top-k survivors are all finite
    if top_k:
        t = idx(top_k)
        sel = _stable_top_k(lp[t], idx([params[b].top_k for b in top_k]))
        only = [j for j, b in enumerate(top_k) if params[b].top_p == 1]
        if only:
            mask[idx([top_k[j] for j in only])] = sel[idx(only)]
        nuc = [j for j, b in enumerate(top_k) if params[b].top_p < 1]
        if nuc:
            finite = torch.isfinite(torch.where(sel[idx(nuc)], lp[idx([top_k[j] for j in nuc])],
                                                0.0)).all(dim=1).tolist()
            short = [top_k[j] for j, ok in zip(nuc, finite, strict=True) if ok]
            sel_short = sel[idx([j for j, ok in zip(nuc, finite, strict=True) if ok])]
    full = [b for b in sampled if params[b].top_p < 1 and b not in set(short)]
    for group, sort_all in ((short, False), (full, True)):
        if not group:
            continue
        r = idx(group)
        if sort_all:
            values, order = torch.sort(lp[r], dim=1, descending=True, stable=True)
        else:  # sort the k survivors only: by id, then stably by value (descending)
            kmax = max(params[b].top_k for b in group)
            cand = torch.topk(torch.where(sel_short, lp[r], -math.inf), kmax, dim=1)
            ids, perm = torch.sort(cand.indices, dim=1)
            vals, perm2 = torch.sort(cand.values.gather(1, perm), dim=1, descending=True,
                                     stable=True)
            order = ids.gather(1, perm2)
            values = torch.full((len(group), vocab), -math.inf, dtype=torch.float64, device=dev)
            values[:, :kmax] = vals
        ks = idx([params[b].top_k if 0 < params[b].top_k < vocab else vocab for b in group])
        temps = torch.tensor([params[b].temperature for b in group], dtype=torch.float64,
                             device=dev)
        tops = torch.tensor([params[b].top_p for b in group], dtype=torch.float64, device=dev)
        in_k = torch.arange(vocab, device=dev)[None, :] < ks[:, None]
        scaled = torch.where(in_k, values / temps[:, None], -math.inf)
        cum = torch.cumsum(torch.softmax(scaled, dim=1), dim=1)
        prefix_mass = torch.cat([torch.zeros_like(cum[:, :1]), cum[:, :-1]], dim=1)
        keep = in_k & (prefix_mass < tops[:, None])
        keep[:, 0] = True  # the most likely token (the first maximum: the order is stable)
        mask[r] = torch.zeros((len(group), vocab), dtype=torch.bool, device=dev).scatter_(
            1, order, keep[:, :order.shape[1]])
    return mask


def select_tokens(logprobs: torch.Tensor, seeds: Sequence[int], positions: Sequence[int],
                  params: Sequence[SamplingParams]) -> list[int]:
    """`select_token` for a batch: row b of (B, V) logprobs with seeds[b], positions[b].

    Batched in torch (`allowed_masks`, `gumbel_rows`): the same tokens as `select_token` row by
    row, without a Python loop over rows.
    """
    lp = logprobs.detach().to(torch.float64)
    rows, vocab = lp.shape
    sampled = [b for b in range(rows) if not params[b].greedy]
    out = [int(i) for i in torch.argmax(lp, dim=1).tolist()]
    if sampled:
        s = torch.tensor(sampled, dtype=torch.int64, device=lp.device)
        sub = lp[s] if len(sampled) < rows else lp
        ps = [params[b] for b in sampled]
        temps = torch.tensor([p.temperature for p in ps], dtype=torch.float64, device=lp.device)
        score = sub / temps[:, None]
        score += gumbel_rows([seeds[b] for b in sampled], [positions[b] for b in sampled],
                             vocab, lp.device)
        score.masked_fill_(~allowed_masks(sub, ps), -math.inf)
        for b, tok in zip(sampled, torch.argmax(score, dim=1).tolist(), strict=True):
            out[b] = int(tok)
    return out


# --- verification ---------------------------------------------------------------------------


def sampling_margins(logprobs: torch.Tensor, chosen: Sequence[int], seed: int,
                     params: SamplingParams, lp_slack: float = DEFAULT_LP_SLACK,
                     mass_slack: float = DEFAULT_MASS_SLACK) -> np.ndarray:
    """Per output position t, how far the chosen token falls below the best allowed one.

    In logprob units: `T * (max S - S_chosen)` with `S = lp / T + g(seed, t, .)`, the max taken
    over the tokens every honest engine surely allows (`allowed_mask` with negative slack), and
    clipped at 0. A chosen token outside the tolerant set (positive slack) gives +inf.
    T = 0 gives `max lp - lp_chosen`. Returns float64 (N,).
    """
    lp = logprobs.detach().to(torch.float64)
    if lp.dim() != 2 or lp.shape[0] != len(chosen):
        raise ValueError(f"logprobs must be (N, V) with N = len(chosen) = {len(chosen)}, "
                         f"got shape {tuple(lp.shape)}")
    n, vocab = lp.shape
    out = np.zeros(n, dtype=np.float64)
    if n == 0:
        return out
    ids = torch.as_tensor(list(chosen), dtype=torch.int64, device=lp.device)
    if bool(((ids < 0) | (ids >= vocab)).any()):
        raise ValueError(f"chosen token ids must be in [0, {vocab})")
    rows = torch.arange(n, device=lp.device)
    if params.greedy:
        return (lp.max(dim=1).values - lp[rows, ids]).cpu().numpy()
    t = params.temperature
    g = gumbel_rows([seed] * n, list(range(n)), vocab, lp.device)
    score = lp / t + g
    for i in range(n):
        outer = allowed_mask(lp[i], params, lp_slack, mass_slack)
        c = int(ids[i])
        if not bool(outer[c]):
            out[i] = math.inf
            continue
        inner = allowed_mask(lp[i], params, -lp_slack, -mass_slack)
        best = float(score[i][inner].max())
        out[i] = max(0.0, t * (best - float(score[i, c])))
    return out
