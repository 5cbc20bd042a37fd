"""Engine selection: the one place that knows which backends exist.

The pipeline asks for an engine by model name and never asks which backend it got.
"""

from __future__ import annotations

from pathlib import Path

from ..model import ensure_model
from .base import Engine


def load_engine(model: str, *, data_dir: Path | None = None, k: int = 5,
                cheat_with: str | None = None, progress: bool = False) -> Engine:
    """The reference engine on the network model (built and cached if needed).

    `cheat_with` (demo and tests only) wraps it in the pre-fill attack: generate with the
    named cheaper model, then report this model's logprobs.
    """
    from .reference import ReferenceEngine

    info = ensure_model(model, data_dir, progress=progress)
    engine: Engine = ReferenceEngine(info.path, k=k, model_hash=info.content_hash)
    if cheat_with:
        from .prefill_attack import PrefillAttackEngine

        cheap_info = ensure_model(cheat_with, data_dir, progress=progress)
        cheap = ReferenceEngine(cheap_info.path, k=k, model_hash=cheap_info.content_hash)
        engine = PrefillAttackEngine(cheap=cheap, real=engine)
    return engine
