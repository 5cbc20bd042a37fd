"""Engine selection: the one place that knows which backends exist.

The pipeline asks for an engine by model name and never asks which backend it got.
`engine` picks the backend: "reference" (the torch engine, the default), "vllm", or "auto"
(vLLM when it imports, else the reference engine). A site's `config.EngineOptions` (dtype,
tensor / pipeline parallelism, max_num_seqs, gpu_memory_utilization) become the backend's
constructor arguments here (`backend_kwargs`): all of them for vLLM; for the reference engine
dtype, and max_num_seqs as its batch size, while parallelism > 1 is an error (it runs one
model copy on one device) and gpu_memory_utilization is ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import EngineOptions, parallel_error
from ..errors import ValidationError
from ..model import ensure_model
from .base import Engine

ENGINES = ("auto", "reference", "vllm")


def resolve_engine(engine: str) -> str:
    """The backend `engine` names: "auto" becomes "vllm" when vLLM imports, else "reference"."""
    if engine not in ENGINES:
        raise ValidationError(f"engine must be one of {list(ENGINES)}, got {engine!r}",
                              field="engine")
    if engine == "auto":
        from .vllm import available

        return "vllm" if available() else "reference"
    return engine


def backend_kwargs(options: EngineOptions, backend: str) -> dict[str, Any]:
    """The constructor arguments `options` mean for `backend` ("reference" or "vllm")."""
    if backend == "vllm":
        kw: dict[str, Any] = {"dtype": options.dtype,
                              "tensor_parallel_size": options.tensor_parallel_size,
                              "pipeline_parallel_size": options.pipeline_parallel_size,
                              "gpu_memory_utilization": options.gpu_memory_utilization}
        if options.max_num_seqs is not None:
            kw["max_num_seqs"] = options.max_num_seqs
        return kw
    if options.tensor_parallel_size > 1 or options.pipeline_parallel_size > 1:
        # engine: auto on a machine without vLLM
        raise ValidationError(parallel_error(options.tensor_parallel_size,
                                             options.pipeline_parallel_size) +
                              f"; engine {options.engine!r} resolved to the reference engine",
                              field="tensor_parallel_size")
    kw = {"dtype": options.dtype}
    if options.max_num_seqs is not None:
        kw["max_batch_size"] = options.max_num_seqs
    return kw


def load_engine(model: str, *, data_dir: Path | None = None, k: int = 5,
                cheat_with: str | None = None, progress: bool = False,
                engine: str = "reference", options: EngineOptions | None = None,
                **engine_kwargs: Any) -> Engine:
    """An engine on the network model (built and cached if needed).

    `options` (a site's engine settings) choose the backend and its arguments, overriding
    `engine`; `engine_kwargs` go to the backend's constructor on top (e.g. enforce_eager).
    `cheat_with` (demo and tests only) wraps it in the pre-fill attack: generate with the
    named cheaper model (on the reference engine), then report this model's logprobs.
    """
    from .reference import ReferenceEngine

    if options is not None:
        engine = options.engine
    backend = resolve_engine(engine)
    if options is not None:
        engine_kwargs = {**backend_kwargs(options, backend), **engine_kwargs}
    info = ensure_model(model, data_dir, progress=progress)
    real: Engine
    if backend == "vllm":
        from .vllm import VllmEngine

        real = VllmEngine(info.path, k=k, model_hash=info.content_hash, **engine_kwargs)
    else:
        real = ReferenceEngine(info.path, k=k, model_hash=info.content_hash, **engine_kwargs)
    if cheat_with:
        from .prefill_attack import PrefillAttackEngine

        cheap_info = ensure_model(cheat_with, data_dir, progress=progress)
        cheap = ReferenceEngine(cheap_info.path, k=k, model_hash=cheap_info.content_hash)
        return PrefillAttackEngine(cheap=cheap, real=real)
    return real
