"""Loaded replicas: one copy of a model on one device, answering with typed replies.

* :mod:`.base`: :class:`Replica` (admission, the requests in flight, counters, shutdown) and
  :class:`Flight` (one admitted request);
* :mod:`.llm`: :class:`LLMReplica`, a causal LM behind a batching (or the echo) engine;
* :mod:`.embedding`: :class:`EmbeddingReplica`, a sentence-embedding model.
"""

from .base import DEFAULT_REQUEST_LIMITS, Flight, Replica
from .embedding import MAX_EMBED_INPUTS, EmbeddingReplica
from .llm import DEFAULT_MAX_TOKENS, LLMReplica

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "DEFAULT_REQUEST_LIMITS",
    "MAX_EMBED_INPUTS",
    "EmbeddingReplica",
    "Flight",
    "LLMReplica",
    "Replica",
]
