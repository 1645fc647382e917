"""A sentence-embedding replica: texts to vectors, one batch at a time, as a typed embedding list."""

from __future__ import annotations

from typing import Any

from broker_client import BadRequest, EmbedRequest

from ..replies import EmbeddingListBody
from .base import Flight, Replica

__all__ = ["MAX_EMBED_INPUTS", "EmbeddingReplica"]

MAX_EMBED_INPUTS = 2048


class EmbeddingReplica(Replica):
    """A sentence-embedding model behind an :class:`~workers.engines.EmbeddingEngine`."""

    model_type = "embedding"

    def __init__(self, *, engine: Any, dimensions: int, max_length: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.engine = engine
        self.dimensions = dimensions
        self.max_length = max_length
        self.prompt_tokens = 0

    def extra_info(self) -> dict[str, Any]:
        return {
            "dimensions": self.dimensions,
            "max_length": self.max_length,
            "prompt_tokens": self.prompt_tokens,
        }

    async def _close_engine(self) -> None:
        self.engine = None

    async def embed(self, req: EmbedRequest, flight: Flight) -> EmbeddingListBody:
        texts = [req.input] if isinstance(req.input, str) else req.input
        if len(texts) > MAX_EMBED_INPUTS:
            raise BadRequest(
                f"input holds {len(texts)} texts; model {self.model_uid!r} embeds at most "
                f"{MAX_EMBED_INPUTS} per request"
            )
        vectors, prompt_tokens = await self.engine.aembed(texts)
        self.prompt_tokens += prompt_tokens
        return {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": vector} for i, vector in enumerate(vectors)
            ],
            "model": self.model_uid,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
        }
