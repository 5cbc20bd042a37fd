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


def _fmix32_np(h: np.ndarray) -> np.ndarray:
    """`_fmix32_py` on a uint32 array: numpy's uint32 products wrap mod 2**32 by themselves, so
    this is 5 array operations where the int64 torch version needs 12 (3x faster on CPU)."""
    h = h ^ (h >> np.uint32(16))
    h *= np.uint32(_C1)
    h ^= h >> np.uint32(13)
    h *= np.uint32(_C2)
    h ^= h >> np.uint32(16)
    return h


def _hash_rows(seeds: Sequence[int], positions: Sequence[int], vocab_size: int,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """(B, V) hashes as int64, row b for (seeds[b], positions[b]) over token ids 0..V-1."""
    prefixes = [_prefix_py(s, p) for s, p in zip(seeds, positions, strict=True)]
    if torch.device(device).type == "cpu":
        h = _fmix32_np(np.asarray(prefixes, dtype=np.uint32)[:, None]
                       ^ np.arange(vocab_size, dtype=np.uint32)[None, :])
        return torch.from_numpy(h.astype(np.int64))
    prefix = torch.tensor(prefixes, dtype=torch.int64, device=device)
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


def ban_eos(logprobs: torch.Tensor, positions: Sequence[int], min_tokens: int | Sequence[int],
            eos_id: int) -> torch.Tensor:
    """A copy of (N, V) raw logprobs with EOS at -inf in every row whose output position is
    below its `min_tokens` (one int for all rows, or one per row): the selection logprobs of a
    request with `min_tokens` (vLLM's MinTokensLogitsProcessor, applied before temperature,
    top-k, top-p and the Gumbel noise). No renormalization: every selection step is invariant
    to a constant shift of a row. Reported logprobs stay the raw ones."""
    lp = logprobs.clone()
    if lp.dim() != 2 or lp.shape[0] != len(positions):
        raise ValueError(f"logprobs must be (N, V) with N = len(positions) = {len(positions)}, "
                         f"got shape {tuple(lp.shape)}")
    mins = [min_tokens] * len(positions) if isinstance(min_tokens, int) else list(min_tokens)
    if len(mins) != len(positions):
        raise ValueError(f"min_tokens: {len(mins)} values for {len(positions)} rows")
    rows = [r for r, (p, m) in enumerate(zip(positions, mins)) if p < m]
    if rows:
        lp[torch.tensor(rows, dtype=torch.int64, device=lp.device), eos_id] = -math.inf
    return lp


# --- verification ---------------------------------------------------------------------------


MASK_WINDOW = 128
"""`allowed_mask_rows` decides each row among its top MASK_WINDOW tokens when it can."""


def allowed_mask_rows(logprobs: torch.Tensor, params: SamplingParams, lp_slack: float = 0.0,
                      mass_slack: float = 0.0, window: int = MASK_WINDOW) -> torch.Tensor:
    """`allowed_mask` for every row of (N, V) logprobs that share one request's parameters.

    The verifier's masks for all positions of an output at once, slack included. A full
    stable sort of every row costs more than everything else the verifier does, so each row
    is first decided among its `window` most likely tokens (`torch.topk`, then ordered stably
    by value and id): the kept set is a prefix of the sorted order, every token above the
    window's last value is inside it, and near-tie ranks and nucleus masses of the tokens in
    it are the same numbers. A row whose kept prefix reaches the window's end (or ties with
    it, or needs near-tie counts past it) is redone by the full sort (`_sorted_mask_rows`).
    tests/test_sampling.py checks both against `allowed_mask` row by row on random rows with
    ties, -inf logprobs and both slack signs. Returns bool (N, V).
    """
    return _rows_masks(logprobs, params, [(lp_slack, mass_slack)], window)[0]


def _rows_masks(logprobs: torch.Tensor, params: SamplingParams,
                slacks: Sequence[tuple[float, float]], window: int) -> list[torch.Tensor]:
    """`allowed_mask_rows` for each (lp_slack, mass_slack), sharing one top-k window."""
    lp = logprobs.detach().to(torch.float64)
    if lp.dim() != 2:
        raise ValueError(f"logprobs must be (N, V), got shape {tuple(lp.shape)}")
    n, vocab = lp.shape
    dev = lp.device
    rows = torch.arange(n, device=dev)
    top = torch.argmax(lp, dim=1)  # first maximum of each row
    t = params.temperature
    if t == 0:
        masks = []
        for lp_slack, _ in slacks:
            mask = lp >= (lp[rows, top] - max(lp_slack, 0.0))[:, None]
            mask[rows, top] = True
            masks.append(mask)
        return masks
    if n == 0 or (params.top_k in (0, vocab) and params.top_p == 1):
        return [torch.ones((n, vocab), dtype=torch.bool, device=dev) for _ in slacks]
    k = params.top_k if 0 < params.top_k < vocab else 0
    m = min(vocab, window)
    if m >= vocab or k + 1 >= m:
        return [_sorted_mask_rows(lp, params, ls / t, ms, top) for ls, ms in slacks]
    cand = torch.topk(lp, m, dim=1)
    ids, perm = torch.sort(cand.indices, dim=1)  # ties in id order, then stably by value
    values, perm2 = torch.sort(cand.values.gather(1, perm), dim=1, descending=True,
                               stable=True)
    order = ids.gather(1, perm2)
    probs_all = None  # without top-k every slack renormalizes over the whole row
    masks = []
    for lp_slack, mass_slack in slacks:
        tol = lp_slack / t
        if tol == 0:
            above = torch.arange(m, device=dev).expand(n, m)
            sat = torch.zeros((n, m), dtype=torch.bool, device=dev)
        else:
            neg = (-values).contiguous()
            if tol > 0:  # every value above v + tol is above the window's last: exact count
                above = torch.searchsorted(neg, -(values + tol), right=False)
                sat = torch.zeros((n, m), dtype=torch.bool, device=dev)
            else:  # values >= v + tol may continue past the window: such counts are unknown
                count = torch.searchsorted(neg, -(values + tol), right=True)
                above, sat = count - 1, count >= m
        keep = torch.ones((n, m), dtype=torch.bool, device=dev)
        if k:
            keep &= above < k
        if params.top_p < 1:
            # the nucleus renormalizes over every token top-k keeps, in the window or not
            if not k:
                if probs_all is None:
                    probs_all = torch.softmax(lp / t, dim=1)
                row_probs = probs_all
            else:
                if tol == 0:
                    kept = _stable_top_k(lp, torch.full((n,), k, dtype=torch.int64,
                                                        device=dev))
                elif tol > 0:  # rank < k  <=>  v + tol >= the k-th largest value
                    kept = lp + tol >= values[:, k - 1:k]
                else:  # rank < k  <=>  v + tol > the (k+1)-th largest value
                    kept = lp + tol > values[:, k:k + 1]
                row_probs = torch.softmax(torch.where(kept, lp / t,
                                                      torch.full_like(lp, -math.inf)), dim=1)
            keep &= _in_nucleus(row_probs.gather(1, order), above, tol, params.top_p,
                                mass_slack)
        last_kept = (keep.sum(dim=1) - 1).clamp(min=0)
        redo = keep[:, -1] | (sat & keep).any(dim=1) | (
            values[rows, last_kept] == values[:, -1])
        mask = torch.zeros((n, vocab), dtype=torch.bool, device=dev).scatter_(1, order, keep)
        mask[rows, top] = True
        if bool(redo.any()):
            r = torch.nonzero(redo).flatten()
            mask[r] = _sorted_mask_rows(lp[r], params, tol, mass_slack, top[r])
        masks.append(mask)
    return masks


def _in_nucleus(probs: torch.Tensor, above: torch.Tensor, tol: float, top_p: float,
                mass_slack: float) -> torch.Tensor:
    """Rows of tokens in sorted order with their renormalized probabilities and near-tie ranks
    `above` (`_above`): which are inside the nucleus `top_p + mass_slack` (`allowed_mask`'s
    prefix-mass rule, batched)."""
    cum = torch.cumsum(probs, dim=1)
    if tol < 0:  # the prefix counted is `above + 1` long and holds the token itself
        prefix_mass = cum.gather(1, above) - probs
    else:
        prefix_mass = torch.where(above > 0, cum.gather(1, (above - 1).clamp(min=0)),
                                  torch.zeros_like(cum))
    limit = top_p + mass_slack
    return (prefix_mass <= limit) if mass_slack > 0 else (prefix_mass < limit)


def _sorted_mask_rows(lp: torch.Tensor, params: SamplingParams, tol: float, mass_slack: float,
                      top: torch.Tensor) -> torch.Tensor:
    """`allowed_mask`'s own steps on every row at once: a full stable sort per row."""
    n, vocab = lp.shape
    dev = lp.device
    t = params.temperature
    values, order = torch.sort(lp, dim=1, descending=True, stable=True)
    if tol == 0:
        above = torch.arange(vocab, device=dev).expand(n, vocab)
    else:
        neg = (-values).contiguous()  # ascending per row
        if tol > 0:
            above = torch.searchsorted(neg, -(values + tol), right=False)
        else:
            above = torch.searchsorted(neg, -(values + tol), right=True) - 1
    keep = torch.ones((n, vocab), dtype=torch.bool, device=dev)  # in sorted order
    if 0 < params.top_k < vocab:
        keep &= above < params.top_k
    if params.top_p < 1:
        scaled = torch.where(keep, values / t, torch.full_like(values, -math.inf))
        keep &= _in_nucleus(torch.softmax(scaled, dim=1), above, tol, params.top_p,
                            mass_slack)
    mask = torch.zeros((n, vocab), dtype=torch.bool, device=dev).scatter_(1, order, keep)
    mask[torch.arange(n, device=dev), top] = True
    return mask


def margins_of_rows(lp: torch.Tensor, ids: torch.Tensor, score: torch.Tensor, t: float,
                params: SamplingParams, lp_slack: float, mass_slack: float) -> torch.Tensor:
    """`sampling_margins` (float64 tensor (N,)) of rows whose chosen tokens `ids` and noisy
    scores `score = lp / T + gumbel` are already at hand (the verifier's fast path has them)."""
    rows = torch.arange(lp.shape[0], device=lp.device)
    outer, inner = _rows_masks(lp, params, [(lp_slack, mass_slack), (-lp_slack, -mass_slack)],
                               MASK_WINDOW)
    best = torch.where(inner, score, torch.full_like(score, -math.inf)).max(dim=1).values
    out = (t * (best - score[rows, ids])).clamp(min=0.0)
    return torch.where(outer[rows, ids], out, torch.full_like(out, math.inf))


def sampling_margins(logprobs: torch.Tensor, chosen: Sequence[int], seed: int,
                     params: SamplingParams, lp_slack: float = DEFAULT_LP_SLACK,
                     mass_slack: float = DEFAULT_MASS_SLACK) -> np.ndarray:
    """Per output position t, how far the chosen token falls below the best allowed one.

    In logprob units: `T * (max S - S_chosen)` with `S = lp / T + g(seed, t, .)`, the max taken
    over the tokens every honest engine surely allows (`allowed_mask` with negative slack), and
    clipped at 0. A chosen token outside the tolerant set (positive slack) gives +inf.
    T = 0 gives `max lp - lp_chosen`. Returns float64 (N,). All positions at once
    (`allowed_mask_rows`).
    """
    lp = logprobs.detach().to(torch.float64)
    if lp.dim() != 2 or lp.shape[0] != len(chosen):
        raise ValueError(f"logprobs must be (N, V) with N = len(chosen) = {len(chosen)}, "
                         f"got shape {tuple(lp.shape)}")
    n, vocab = lp.shape
    if n == 0:
        return np.zeros(0, dtype=np.float64)
    ids = torch.as_tensor(list(chosen), dtype=torch.int64, device=lp.device)
    if bool(((ids < 0) | (ids >= vocab)).any()):
        raise ValueError(f"chosen token ids must be in [0, {vocab})")
    rows = torch.arange(n, device=lp.device)
    if params.greedy:
        return (lp.max(dim=1).values - lp[rows, ids]).cpu().numpy()
    t = params.temperature
    score = lp / t + gumbel_rows([seed] * n, list(range(n)), vocab, lp.device)
    return margins_of_rows(lp, ids, score, t, params, lp_slack, mass_slack).cpu().numpy()
