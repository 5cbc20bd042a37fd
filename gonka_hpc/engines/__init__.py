"""Inference engines behind one interface (`base.Engine`): the reference torch engine, vLLM.

Import a backend from its module (`gonka_hpc.engines.reference`); this package only re-exports
the interface and its records.
"""

from .base import Engine, Generation, GenerationRequest, Scoring

__all__ = ["Engine", "Generation", "GenerationRequest", "Scoring"]
