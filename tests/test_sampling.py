"""Seeded verifiable sampling (gonka_hpc.sampling): hash, noise, filters, selection, margins.

The torch hash is checked bit for bit against the pure-Python one (edge values, 1 and 2 threads)
and pinned by golden vectors, because executors and verifiers on different machines must agree.
Gumbel noise is checked against its theoretical moments, Gumbel-max against the softmax it
samples from, and the filters and margins on hand-made distributions.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from gonka_hpc.sampling import (
    SamplingParams,
    allowed_mask,
    allowed_mask_rows,
    allowed_masks,
    derive_seed,
    gumbel,
    gumbel_rows,
    hash32,
    hash32_py,
    sampling_margins,
    select_token,
    select_tokens,
)

EDGE_SEEDS = [0, 1, 2**32 - 1, 2**32, 2**63, 2**64 - 1, 0x0123456789ABCDEF]


def _lp(values: list[float]) -> torch.Tensor:
    return torch.log_softmax(torch.tensor(values, dtype=torch.float64), dim=0).float()


# --- seeds and hash -------------------------------------------------------------------------


def test_derive_seed_golden_and_sensitive() -> None:
    block = "00" * 32
    assert derive_seed(block, "req-1", None) == 1856786424816597660
    assert derive_seed(block, "req-1", 7) == 8254705948120294265
    seeds = {derive_seed(block, "req-1", None), derive_seed(block, "req-2", None),
             derive_seed("11" * 32, "req-1", None), derive_seed(block, "req-1", 0)}
    assert len(seeds) == 4
    assert all(0 <= s < 2**64 for s in seeds)


def test_hash_golden_vectors() -> None:
    cases = [((0, 0, 0), 937260802), ((1, 2, 3), 3998299758),
             ((2**64 - 1, 2**32 - 1, 2**32 - 1), 2208095877),
             ((0x0123456789ABCDEF, 17, 1999), 3095924659)]
    for (seed, pos, tok), expected in cases:
        assert hash32_py(seed, pos, tok) == expected
        assert int(hash32(seed, pos, torch.tensor([tok]))[0]) == expected


@pytest.mark.parametrize("threads", [1, 2])
def test_hash_torch_equals_python(threads: int) -> None:
    rng = random.Random(5)
    ids = [0, 1, 2, 0xFFFF, 0x10000, 2**31, 2**32 - 1] + [rng.randrange(2**32) for _ in range(300)]
    positions = [0, 1, 2**16, 2**32 - 1] + [rng.randrange(4096) for _ in range(6)]
    seeds = EDGE_SEEDS + [rng.randrange(2**64) for _ in range(6)]
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for seed in seeds:
            for pos in positions:
                got = hash32(seed, pos, torch.tensor(ids, dtype=torch.int64)).tolist()
                assert got == [hash32_py(seed, pos, t) for t in ids], (seed, pos)
                assert all(0 <= h < 2**32 for h in got)
    finally:
        torch.set_num_threads(prev)


def test_rows_hash_on_cpu_equals_the_torch_hash() -> None:
    # gumbel_rows on CPU hashes in numpy uint32 (the engines' and the verifier's hot path); it
    # must be the torch/Python hash bit for bit, ids past 16 bits and edge seeds included.
    from gonka_hpc.sampling import _hash_rows

    seeds = EDGE_SEEDS + [2**64 - 2]
    positions = [0, 1, 2**16, 2**32 - 1, 5, 77, 4095, 2**31]
    rows = _hash_rows(seeds, positions, 70_000)
    assert rows.dtype == torch.int64 and rows.shape == (8, 70_000)
    ids = torch.arange(70_000, dtype=torch.int64)
    for b, (seed, pos) in enumerate(zip(seeds, positions, strict=True)):
        assert torch.equal(rows[b], hash32(seed, pos, ids)), (seed, pos)
    assert rows[3, 65_537].item() == hash32_py(seeds[3], positions[3], 65_537)


def test_hash_rejects_out_of_range() -> None:
    with pytest.raises(ValueError, match="seed"):
        hash32_py(2**64, 0, 0)
    with pytest.raises(ValueError, match="position"):
        hash32_py(0, -1, 0)
    with pytest.raises(ValueError, match="token_id"):
        hash32_py(0, 0, 2**32)


def test_gumbel_moments_match_theory() -> None:
    g = gumbel(12345, 7, 131_072)
    assert g.dtype == torch.float64
    assert abs(float(g.mean()) - 0.5772156649) < 0.015
    assert abs(float(g.var()) - math.pi**2 / 6) < 0.04
    # Rows differ by position and by seed, and the batched form equals the single one.
    rows = gumbel_rows([12345, 12345, 999], [7, 8, 7], 64)
    assert torch.equal(rows[0], g[:64])
    assert not torch.equal(rows[0], rows[1]) and not torch.equal(rows[0], rows[2])


# --- parameters -----------------------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"temperature": -0.1}, "temperature"), ({"temperature": math.nan}, "temperature"),
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"), ({"top_k": 2.5}, "top_k"),
])
def test_invalid_params_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field) as err:
        SamplingParams(**kwargs)
    assert repr(next(iter(kwargs.values()))) in str(err.value)


# --- filters --------------------------------------------------------------------------------


def test_top_k_mask() -> None:
    lp = _lp([0.0, 3.0, 1.0, 2.0, -1.0])
    mask = allowed_mask(lp, SamplingParams(top_k=2))
    assert mask.tolist() == [False, True, False, True, False]
    assert allowed_mask(lp, SamplingParams(top_k=0)).all()
    assert allowed_mask(lp, SamplingParams(top_k=99)).all()


def test_top_p_mask_smallest_prefix() -> None:
    lp = _lp([math.log(p) for p in (0.5, 0.3, 0.15, 0.05)])
    assert allowed_mask(lp, SamplingParams(top_p=0.5)).tolist() == [True, False, False, False]
    assert allowed_mask(lp, SamplingParams(top_p=0.6)).tolist() == [True, True, False, False]
    assert allowed_mask(lp, SamplingParams(top_p=0.9)).tolist() == [True, True, True, False]
    assert allowed_mask(lp, SamplingParams(top_p=1.0)).all()
    # Temperature sharpens before the nucleus: at T=0.2 token 0 alone holds > 0.9.
    assert allowed_mask(lp, SamplingParams(temperature=0.2, top_p=0.9)).sum() == 1
    # Top-k first, then top-p on the renormalized survivors (0.5/0.8 = 0.625 < 0.7).
    assert allowed_mask(lp, SamplingParams(top_k=2, top_p=0.7)).tolist() == [
        True, True, False, False]


def test_top_p_one_keeps_tiny_tail() -> None:
    lp = torch.tensor([0.0, -60.0, -80.0, -100.0], dtype=torch.float32)
    assert allowed_mask(lp, SamplingParams(top_p=1.0)).all()


def test_slack_widens_and_narrows() -> None:
    # Token 2 has 0.905 of mass before it: just outside a 0.9 nucleus, inside a tolerant one.
    lp = _lp([math.log(p) for p in (0.6, 0.305, 0.05, 0.045)])
    params = SamplingParams(top_p=0.9)
    assert allowed_mask(lp, params).tolist() == [True, True, False, False]
    assert allowed_mask(lp, params, lp_slack=0.1, mass_slack=0.02).tolist() == [
        True, True, True, False]
    # Token 1 has 0.87 before it: inside a 0.88 nucleus, but not surely (narrowed) inside.
    lp = _lp([math.log(p) for p in (0.87, 0.1, 0.02, 0.01)])
    params = SamplingParams(top_p=0.88)
    assert allowed_mask(lp, params).tolist() == [True, True, False, False]
    assert allowed_mask(lp, params, lp_slack=-0.1, mass_slack=-0.02).tolist() == [
        True, False, False, False]
    # Near-tied tokens at a top-k boundary: tolerant keeps both, narrow keeps neither.
    lp2 = torch.tensor([-0.1, -2.0, -2.05, -5.0])
    assert allowed_mask(lp2, SamplingParams(top_k=2)).tolist() == [True, True, False, False]
    assert allowed_mask(lp2, SamplingParams(top_k=2), lp_slack=0.1).tolist() == [
        True, True, True, False]
    assert allowed_mask(lp2, SamplingParams(top_k=2), lp_slack=-0.1).tolist() == [
        True, False, False, False]


# --- selection ------------------------------------------------------------------------------


def test_temperature_zero_is_greedy() -> None:
    lp = _lp([0.1, 2.0, 2.0, -1.0])  # tie between 1 and 2: the lower id wins
    for seed in (0, 1, 2**64 - 1):
        for pos in range(5):
            assert select_token(lp, seed, pos, SamplingParams(temperature=0)) == 1


def test_selection_respects_mask_and_seed() -> None:
    lp = _lp([1.0, 0.9, 0.8, 0.7, 0.6, 0.5])
    params = SamplingParams(temperature=1.0, top_k=3)
    picks = [select_token(lp, 77, pos, params) for pos in range(200)]
    assert set(picks) == {0, 1, 2}
    assert picks == [select_token(lp, 77, pos, params) for pos in range(200)]
    assert picks != [select_token(lp, 78, pos, params) for pos in range(200)]


def test_gumbel_max_samples_the_softmax() -> None:
    probs = np.array([0.5, 0.25, 0.15, 0.1])
    lp = torch.tensor(np.log(probs), dtype=torch.float32)
    n = 4000
    picks = np.array([select_token(lp, 4242, pos, SamplingParams()) for pos in range(n)])
    freq = np.bincount(picks, minlength=4) / n
    assert np.abs(freq - probs).max() < 0.03
    # Halving the temperature squares and renormalizes the probabilities.
    sharp = probs**2 / (probs**2).sum()
    picks = np.array([select_token(lp, 4242, pos, SamplingParams(temperature=0.5))
                      for pos in range(n)])
    assert np.abs(np.bincount(picks, minlength=4) / n - sharp).max() < 0.03


def test_batched_select_equals_single() -> None:
    gen = torch.Generator().manual_seed(3)
    lp = torch.log_softmax(torch.randn(5, 50, generator=gen) * 3, dim=1)
    params = [SamplingParams(), SamplingParams(temperature=0), SamplingParams(0.7, 0.9),
              SamplingParams(1.3, 1.0, 5), SamplingParams(0.5, 0.5, 2)]
    seeds, positions = [1, 2, 3, 2**64 - 1, 5], [0, 4, 9, 2, 31]
    got = select_tokens(lp, seeds, positions, params)
    assert got == [select_token(lp[b], seeds[b], positions[b], params[b]) for b in range(5)]


def _random_rows(seed: int, rows: int, vocab: int) -> tuple[torch.Tensor, list[SamplingParams]]:
    """Rows with sharp and flat distributions, exact ties, and a mix of parameters."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.rand(rows, 1, generator=gen, dtype=torch.float64) * 6
    logits = torch.randn(rows, vocab, generator=gen, dtype=torch.float64) * scale
    logits[::3, 1:7] = logits[::3, :1]  # ties with the maximum's neighbours
    logits[1::4] = torch.round(logits[1::4])  # many ties everywhere
    logits[2::7, 3:] = -math.inf  # three possible tokens: top-k reaches -inf logprobs
    lp = torch.log_softmax(logits, dim=1).float()
    rng = random.Random(seed)
    params = [SamplingParams(rng.choice([0.0, 0.3, 0.7, 1.0, 1.5]),
                             rng.choice([1.0, 1.0, 0.9, 0.5, 0.99, 0.2]),
                             rng.choice([0, 0, 1, 2, 5, 40, vocab, vocab + 3]))
              for _ in range(rows)]
    return lp, params


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batched_masks_and_selection_equal_row_by_row(seed: int) -> None:
    # The engines' batched path must pick exactly the tokens of the one-row definition that
    # the verifier reasons about, ties and boundary cases included.
    lp, params = _random_rows(seed, 96, 257)
    masks = allowed_masks(lp, params)
    for b in range(lp.shape[0]):
        assert torch.equal(masks[b], allowed_mask(lp[b], params[b])), (b, params[b])
    seeds = [random.Random(seed + b).getrandbits(64) for b in range(96)]
    positions = list(range(96))
    got = select_tokens(lp, seeds, positions, params)
    assert got == [select_token(lp[b], seeds[b], positions[b], params[b]) for b in range(96)]
    assert len(set(got)) > 10  # the rows really sample (not all argmax)
    with pytest.raises(ValueError, match="len\\(params\\)"):
        allowed_masks(lp, params[:-1])


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("slack", [(0.0, 0.0), (0.1, 0.02), (-0.1, -0.02), (2.0, 0.3)])
@pytest.mark.parametrize("window", [8, 64, 1000])
def test_rows_mask_with_slack_equals_row_by_row(seed: int, slack: tuple[float, float],
                                                window: int) -> None:
    # The verifier masks every position of an output at once, deciding most rows inside a
    # window of the most likely tokens (1000 > V: the full sort only); with slack of either
    # sign the sets must be exactly the one-row definition's, ties and -inf logprobs included.
    lp, params = _random_rows(seed, 48, 257)
    lp_slack, mass_slack = slack
    for p in {*params}:
        masks = allowed_mask_rows(lp, p, lp_slack, mass_slack, window=window)
        assert masks.shape == lp.shape and masks.dtype == torch.bool
        for b in range(lp.shape[0]):
            assert torch.equal(masks[b], allowed_mask(lp[b], p, lp_slack, mass_slack)), (b, p)
    assert allowed_mask_rows(lp[:0], SamplingParams(0.7, 0.9)).shape == (0, 257)


def _margins_row_by_row(lp: torch.Tensor, chosen: list[int], seed: int, params: SamplingParams,
                        lp_slack: float, mass_slack: float) -> np.ndarray:
    """The definition of `sampling_margins`, one position at a time."""
    out = np.zeros(len(chosen))
    for t, c in enumerate(chosen):
        row = lp[t].double()
        if params.greedy:
            out[t] = float(row.max() - row[c])
            continue
        score = row / params.temperature + gumbel(seed, t, row.shape[0])
        if not bool(allowed_mask(row, params, lp_slack, mass_slack)[c]):
            out[t] = math.inf
            continue
        inner = allowed_mask(row, params, -lp_slack, -mass_slack)
        out[t] = max(0.0, params.temperature * (float(score[inner].max()) - float(score[c])))
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_margins_equal_their_row_by_row_definition(seed: int) -> None:
    lp, params = _random_rows(seed, 40, 257)
    rng = random.Random(seed)
    for p in {*params}:
        honest = [select_token(lp[t], 99, t, p) for t in range(40)]
        mixed = [c if rng.random() < 0.5 else rng.randrange(257) for c in honest]
        for chosen in (honest, mixed):
            got = sampling_margins(lp, chosen, 99, p, 0.05, 0.01)
            want = _margins_row_by_row(lp, chosen, 99, p, 0.05, 0.01)
            assert np.array_equal(got, want), p


# --- margins --------------------------------------------------------------------------------


@pytest.mark.parametrize("params", [SamplingParams(temperature=0), SamplingParams(0.7, 0.9),
                                    SamplingParams(1.0, 1.0), SamplingParams(1.0, 0.9, 20)])
def test_margins_zero_for_selected_positive_otherwise(params: SamplingParams) -> None:
    gen = torch.Generator().manual_seed(11)
    lp = torch.log_softmax(torch.randn(40, 100, generator=gen) * 2, dim=1)
    seed = 987654321
    chosen = [select_token(lp[t], seed, t, params) for t in range(40)]
    margins = sampling_margins(lp, chosen, seed, params)
    assert margins.dtype == np.float64 and margins.shape == (40,)
    assert np.all(margins == 0.0)
    # Replace each token by the runner-up in the allowed set: margin > 0 (or inf if outside).
    others = []
    for t in range(40):
        mask = allowed_mask(lp[t], params)
        score = lp[t].double() + (0 if params.greedy else
                                  params.temperature * gumbel(seed, t, 100))
        score[~mask] = -math.inf
        score[chosen[t]] = -math.inf
        others.append(int(torch.argmax(score)) if mask.sum() > 1 else (chosen[t] + 1) % 100)
    bad = sampling_margins(lp, others, seed, params)
    # Where the honest token sits in the nucleus boundary's slack band, the verifier cannot
    # tell it from its runner-up; everywhere else the swap shows.
    sure = np.array([bool(allowed_mask(lp[t], params, -0.1, -0.02)[chosen[t]])
                     for t in range(40)])
    assert sure.sum() >= 30
    assert np.all(bad[sure] > 0)


def test_margin_inf_outside_tolerant_set_and_wrong_seed_flagged() -> None:
    lp = _lp([5.0, 4.0, 0.0, -5.0])
    params = SamplingParams(temperature=1.0, top_k=2)
    assert sampling_margins(lp[None], [3], 1, params)[0] == math.inf
    gen = torch.Generator().manual_seed(2)
    rows = torch.log_softmax(torch.randn(64, 30, generator=gen), dim=1)
    honest = [select_token(rows[t], 10, t, SamplingParams()) for t in range(64)]
    assert np.all(sampling_margins(rows, honest, 10, SamplingParams()) == 0)
    assert sampling_margins(rows, honest, 11, SamplingParams()).max() > 0.1
