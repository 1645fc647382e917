"""Inference engines: continuous-batching LLM, sentence embeddings, and the model-less echo."""

from .batching import BatchingEngine, Delta, EngineStats, SamplingParams
from .echo import EchoEngine, is_echo_uri
from .embedding import EmbeddingEngine

__all__ = [
    "BatchingEngine",
    "Delta",
    "EchoEngine",
    "EmbeddingEngine",
    "EngineStats",
    "SamplingParams",
    "is_echo_uri",
]
