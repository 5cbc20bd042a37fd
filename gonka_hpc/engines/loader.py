"""Engine selection: the one place that knows which backends exist.

The pipeline asks for an engine by model name and never asks which backend it got.
`engine` picks the backend: "reference" (the torch engine, the default), "vllm", or "auto"
(vLLM when it imports, else the reference engine).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

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


def load_engine(model: str, *, data_dir: Path | None = None, k: int = 5,
                cheat_with: str | None = None, progress: bool = False,
                engine: str = "reference", **engine_kwargs: Any) -> Engine:
    """An engine on the network model (built and cached if needed).

    `engine_kwargs` go to the backend's constructor (e.g. dtype; for vLLM also max_num_seqs,
    tensor_parallel_size, pipeline_parallel_size, gpu_memory_utilization, enforce_eager).
    `cheat_with` (demo and tests only) wraps it in the pre-fill attack: generate with the
    named cheaper model (on the reference engine), then report this model's logprobs.
    """
    from .reference import ReferenceEngine

    backend = resolve_engine(engine)
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
