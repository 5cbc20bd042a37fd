"""The reference torch engine (gonka_hpc.engines.reference) on the session's gonka-tiny model.

Checks what verification relies on: outputs are a function of the seed alone (not of batch
composition), prefill scoring reproduces generation's logprobs and top-k, and honest sampling
margins recomputed from `score()` are zero in fp32. Also stop strings, EOS and max_tokens.
"""

from __future__ import annotations

import numpy as np
import pytest

from gonka_hpc.engines import Engine, GenerationRequest
from gonka_hpc.engines.base import decode, generate_groups
from gonka_hpc.engines.reference import ReferenceEngine
from gonka_hpc.errors import ValidationError
from gonka_hpc.sampling import SamplingParams, sampling_margins

PROMPTS = ["tell me a story", "count from 12 to 20", "what is 3 plus 4 ?", "list the settings",
           "tell me about the fox", "repeat the red dog", "count to seven in words",
           "tell me a story"]


@pytest.fixture(scope="module")
def engine(tiny_model) -> ReferenceEngine:
    return ReferenceEngine(tiny_model.path, k=5, model_hash=tiny_model.content_hash)


def _prompt(engine: Engine, text: str) -> tuple[int, ...]:
    enc = engine.tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                               add_generation_prompt=True)
    return tuple(enc["input_ids"])


def _requests(engine: Engine, params: SamplingParams, max_tokens: int = 24,
              seed0: int = 1000) -> list[GenerationRequest]:
    return [GenerationRequest(f"r{i}", _prompt(engine, p), max_tokens, params, seed=seed0 + i)
            for i, p in enumerate(PROMPTS)]


def test_engine_identity(engine: ReferenceEngine, tiny_model) -> None:
    assert engine.name == "reference"
    assert engine.model_hash == tiny_model.content_hash
    assert engine.version.startswith("gonka-hpc ") and " torch " in engine.version
    assert engine.vocab_size == len(engine.tokenizer)
    assert engine.max_model_len == 512


def test_same_seed_same_output_other_seed_differs(engine: ReferenceEngine) -> None:
    params = SamplingParams(temperature=1.0)
    reqs = _requests(engine, params)
    first, again = engine.generate(reqs), engine.generate(reqs)
    for a, b in zip(first, again, strict=True):
        assert a.output_ids == b.output_ids and a.text == b.text
        assert np.array_equal(a.token_logprobs, b.token_logprobs)
    other = engine.generate(_requests(engine, params, seed0=5000))
    assert sum(a.output_ids != b.output_ids for a, b in zip(first, other, strict=True)) >= 4


def test_batch_equals_one_at_a_time(engine: ReferenceEngine) -> None:
    mixed = [SamplingParams(1.0), SamplingParams(0.0), SamplingParams(0.7, 0.9),
             SamplingParams(1.2, 1.0, 10), SamplingParams(0.9, 0.8, 3), SamplingParams(0.5),
             SamplingParams(1.0, 0.95), SamplingParams(0.0, 0.5)]
    reqs = [GenerationRequest(f"m{i}", _prompt(engine, p), 8 + 4 * i, mixed[i], seed=77 + i,
                              stop=(" .",) if i == 5 else ())
            for i, p in enumerate(PROMPTS)]
    batched = engine.generate(reqs)
    assert [g.request_id for g in batched] == [r.request_id for r in reqs]
    for req, gen in zip(reqs, batched, strict=True):
        single = engine.generate([req])[0]
        assert gen.output_ids == single.output_ids, req.request_id
        assert gen.text == single.text and gen.finish_reason == single.finish_reason
        np.testing.assert_allclose(gen.token_logprobs, single.token_logprobs, atol=1e-4)


def test_artifact_shapes_and_progress(engine: ReferenceEngine) -> None:
    counted: list[int] = []
    gens = engine.generate(_requests(engine, SamplingParams(0.8), max_tokens=16), counted.append)
    assert sum(counted) == sum(len(g.output_ids) for g in gens)
    for g in gens:
        n = len(g.output_ids)
        assert 1 <= n <= 16
        assert g.token_logprobs.shape == (n,) and g.token_logprobs.dtype == np.float32
        assert g.topk_ids.shape == (n, 5) and g.topk_ids.dtype == np.int32
        assert g.topk_logprobs.shape == (n, 5) and g.topk_logprobs.dtype == np.float32
        assert np.all(np.diff(g.topk_logprobs, axis=1) <= 0)
        assert np.all(g.token_logprobs <= g.topk_logprobs[:, 0] + 1e-6)


def test_score_matches_generation(engine: ReferenceEngine) -> None:
    reqs = _requests(engine, SamplingParams(1.0), max_tokens=32)
    gens = engine.generate(reqs)
    scores = engine.score([(r.prompt_ids, g.output_ids) for r, g in zip(reqs, gens, strict=True)])
    for g, s in zip(gens, scores, strict=True):
        n = len(g.output_ids)
        assert s.full_logprobs.shape == (n, engine.vocab_size)
        assert np.array_equal(s.topk_ids, g.topk_ids)
        assert np.abs(s.token_logprobs - g.token_logprobs).max() < 1e-3
        assert np.abs(s.topk_logprobs - g.topk_logprobs).max() < 1e-3


@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.0])
@pytest.mark.parametrize("top_p", [0.9, 1.0])
def test_honest_margins_are_zero(engine: ReferenceEngine, temperature: float,
                                 top_p: float) -> None:
    params = SamplingParams(temperature=temperature, top_p=top_p)
    reqs = _requests(engine, params, max_tokens=32, seed0=int(temperature * 100 + top_p * 10))
    gens = engine.generate(reqs)
    scores = engine.score([(r.prompt_ids, g.output_ids) for r, g in zip(reqs, gens, strict=True)])
    for r, g, s in zip(reqs, gens, scores, strict=True):
        margins = sampling_margins(s.full_logprobs, g.output_ids, r.seed, params)
        assert margins.max() <= 1e-4, (r.request_id, margins)
    if temperature > 0:  # the same tokens checked under another seed do not pass
        worst = [sampling_margins(s.full_logprobs, g.output_ids, r.seed + 1, params).max()
                 for r, g, s in zip(reqs, gens, scores, strict=True)]
        assert sum(w > 1e-4 for w in worst) >= 6


def test_max_tokens_and_eos(engine: ReferenceEngine) -> None:
    gens = engine.generate(_requests(engine, SamplingParams(0.0), max_tokens=48))
    story = gens[0]  # stories run long
    assert story.finish_reason in ("length", "stop")
    for g in gens:
        if g.finish_reason == "length":
            assert len(g.output_ids) == 48 and engine.eos_id not in g.output_ids
        else:
            assert g.output_ids[-1] == engine.eos_id
            assert engine.eos_id not in g.output_ids[:-1]
            assert "<|eos|>" not in g.text
    assert any(g.finish_reason == "stop" for g in gens)
    short = engine.generate([GenerationRequest("s", _prompt(engine, "tell me a story"), 3,
                                               SamplingParams(0.0), seed=1)])[0]
    assert short.finish_reason == "length" and len(short.output_ids) == 3


def test_stop_string_cuts_text_and_keeps_tokens(engine: ReferenceEngine) -> None:
    prompt = _prompt(engine, "tell me a story")
    free = engine.generate([GenerationRequest("f", prompt, 40, SamplingParams(0.0), seed=1)])[0]
    words = free.text.split()
    stop = " " + words[len(words) // 2]
    stopped = engine.generate([GenerationRequest("s", prompt, 40, SamplingParams(0.0), seed=1,
                                                 stop=(stop,))])[0]
    assert stopped.finish_reason == "stop"
    assert free.output_ids[:len(stopped.output_ids)] == stopped.output_ids
    assert len(stopped.output_ids) < len(free.output_ids)
    assert stop in decode(engine.tokenizer, stopped.output_ids)  # the last token completes it
    assert stop not in decode(engine.tokenizer, stopped.output_ids[:-1])
    assert stopped.text == free.text[:free.text.index(stop)]


def test_requests_the_engine_cannot_run(engine: ReferenceEngine) -> None:
    prompt = _prompt(engine, "hi")
    with pytest.raises(ValidationError, match="max_tokens"):
        engine.generate([GenerationRequest("x", prompt, 600, SamplingParams(), seed=1)])
    with pytest.raises(ValidationError, match="empty prompt"):
        engine.generate([GenerationRequest("x", (), 4, SamplingParams(), seed=1)])
    with pytest.raises(ValidationError, match="token id"):
        engine.score([(prompt, [engine.vocab_size])])


def test_generate_groups_slices_in_request_order(engine: ReferenceEngine) -> None:
    # How the ML node drives an engine without its own streaming: consecutive slices, each
    # one generate() call, the same tokens as one call over everything.
    reqs = _requests(engine, SamplingParams(0.8, 0.9), max_tokens=8)
    groups = list(generate_groups(engine, reqs, 3))
    assert [[i for i, _ in g] for g in groups] == [[0, 1, 2], [3, 4, 5], [6, 7]]
    whole = engine.generate(reqs)
    assert [g.output_ids for grp in groups for _, g in grp] == [g.output_ids for g in whole]
    with pytest.raises(ValueError, match="group must be >= 1"):
        list(generate_groups(engine, reqs, 0))
