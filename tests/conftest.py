"""Shared pytest fixtures. Each section belongs to one area; keep sections self-contained."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# --- the local model (gonka_hpc.model) ------------------------------------------------------
# Built once: into $GONKA_HOME when set (CI builds it once per run), else into pytest's cache
# directory, which persists across sessions of this checkout. The hash is re-checked each time.


def _model_home(config: pytest.Config, factory: pytest.TempPathFactory) -> Path:
    env = os.environ.get("GONKA_HOME")
    if env:
        return Path(env)
    cache = getattr(config, "cache", None)
    if cache is not None:
        return Path(cache.mkdir("gonka-home"))
    return factory.mktemp("gonka-home")


@pytest.fixture(scope="session")
def model_home(pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The data dir models are built into and cached in, shared by the whole session."""
    return _model_home(pytestconfig, tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_model(model_home: Path):
    """`ModelInfo` of the network model, gonka-tiny (built on first use, about a minute)."""
    from gonka_hpc.model import ensure_model

    return ensure_model("gonka-tiny", data_dir=model_home, progress=False)
