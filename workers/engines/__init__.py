"""Inference engines: continuous-batching LLM, sentence embeddings, and the model-less echo.

``BatchingEngine``, ``StaticBatchingEngine`` and ``EmbeddingEngine`` import torch and
transformers, so they are imported when first used (``from workers.engines import
BatchingEngine`` works as usual): a worker that starts imports this package without them and
answers before they are loaded.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .api import Delta, EngineClosedError, EngineError, EngineStats, RequestCancelledError, SamplingParams
from .echo import EchoEngine, echo_options, is_echo_uri

if TYPE_CHECKING:
    from .batching import BatchingEngine
    from .embedding import EmbeddingEngine
    from .static import StaticBatchingEngine

__all__ = [
    "BatchingEngine",
    "Delta",
    "EchoEngine",
    "EmbeddingEngine",
    "EngineClosedError",
    "EngineError",
    "EngineStats",
    "RequestCancelledError",
    "SamplingParams",
    "StaticBatchingEngine",
    "echo_options",
    "is_echo_uri",
]

_LAZY = {"BatchingEngine": ".batching", "EmbeddingEngine": ".embedding", "StaticBatchingEngine": ".static"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value
