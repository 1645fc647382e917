"""Inference engines: continuous-batching LLM engines, sentence embeddings, and the model-less echo.

Every LLM engine satisfies :class:`~workers.engines.api.Engine` (the embedding engine
:class:`~workers.engines.api.Embedder`); the replica uses nothing else of them.

The LLM engine is split the way vLLM splits its engine: ``scheduler`` (waiting and running
requests, admission, cancels), a KV layout (``kv_padded``: the left-padded dynamic cache;
``kv_slots``: static slots), ``runner`` (eager forwards; bucketed eager or CUDA-graph decode
steps), ``sampler``, ``output`` (detokenizing with ``detokenizer``, stops, finish reasons) and
``bridge`` (generation thread -> event loop). ``core`` is the step loop over them;
``batching`` and ``static`` pick a KV layout and a decode runner for it. ``llama_cpp`` is the
engine of GGUF models (llama.cpp's parallel sequences; its tokenizer in ``llama_vocab``), which
shares the scheduler, output and bridge.

``BatchingEngine``, ``StaticBatchingEngine`` and ``EmbeddingEngine`` import torch and
transformers, so they are imported when first used (``from workers.engines import
BatchingEngine`` works as usual): a worker that starts imports this package without them and
answers before they are loaded.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .api import (
    Delta,
    DeltaStream,
    Embedder,
    Engine,
    EngineClosedError,
    EngineError,
    EngineStats,
    RequestCancelledError,
    SamplingParams,
)
from .echo import EchoEngine, echo_options, is_echo_uri

if TYPE_CHECKING:
    from .batching import BatchingEngine
    from .embedding import EmbeddingEngine
    from .llama_cpp import LlamaCppEngine
    from .static import StaticBatchingEngine

__all__ = [
    "BatchingEngine",
    "Delta",
    "DeltaStream",
    "EchoEngine",
    "Embedder",
    "EmbeddingEngine",
    "Engine",
    "EngineClosedError",
    "EngineError",
    "EngineStats",
    "LlamaCppEngine",
    "RequestCancelledError",
    "SamplingParams",
    "StaticBatchingEngine",
    "echo_options",
    "is_echo_uri",
]

_LAZY = {
    "BatchingEngine": ".batching",
    "EmbeddingEngine": ".embedding",
    "LlamaCppEngine": ".llama_cpp",
    "StaticBatchingEngine": ".static",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value
