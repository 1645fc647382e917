"""Sentence embeddings: tokenise, run the encoder, pool, normalise — as sentence-transformers does.

``EmbeddingEngine`` satisfies :class:`~workers.engines.api.Embedder`. It takes a loaded encoder
(:class:`LoadedEncoder`: what the loader's embedding loading produces) and runs one batch at a time.

The pooling is a re-implementation of ``sentence_transformers`` ``Pooling`` (padded path) so that
the worker does not need that package at run time; the tests compare both to 1e-4.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn.functional as F

from broker_client import BadRequest, InternalError, Unavailable

from .api import Embedder

logger = logging.getLogger(__name__)

__all__ = ["EmbeddingEngine", "LoadedEncoder", "pool"]


class LoadedEncoder(Protocol):
    """What the engine reads of a loaded sentence-embedding model (the loader's
    ``LoadedEmbedding``): the transformer, its tokenizer and how to pool and normalise."""

    @property
    def model(self) -> Any: ...  # None once released

    @property
    def tokenizer(self) -> Any: ...

    @property
    def pooling(self) -> str: ...

    @property
    def normalize(self) -> bool: ...

    @property
    def dimensions(self) -> int: ...

    @property
    def max_length(self) -> int: ...

    @property
    def source(self) -> Any: ...  # for messages: ``source.ref`` or ``source.path``

    @property
    def device(self) -> torch.device: ...

    @property
    def do_lower_case(self) -> bool: ...

    @property
    def released(self) -> bool: ...


def pool(token_embeddings: torch.Tensor, attention_mask: torch.Tensor, mode: str) -> torch.Tensor:
    """One vector per row of ``token_embeddings`` (batch, tokens, dim), ignoring padding."""
    # Half-precision sums over long sequences lose digits; accumulate in float32 as ST does.
    acc_dtype = (
        torch.float32 if token_embeddings.dtype in (torch.float16, torch.bfloat16) else token_embeddings.dtype
    )
    if mode == "cls":
        # The first attended token, which is position 0 unless the tokenizer pads on the left.
        first = attention_mask.to(torch.int).argmax(dim=1)
        index = first.view(-1, 1, 1).expand(-1, 1, token_embeddings.shape[-1])
        return torch.gather(token_embeddings, 1, index).squeeze(1)
    if mode == "max":
        mask = attention_mask.unsqueeze(-1).expand_as(token_embeddings)
        return token_embeddings.masked_fill(mask == 0, float("-inf")).max(dim=1).values
    if mode in ("mean", "mean_sqrt_len_tokens"):
        mask = attention_mask.unsqueeze(-1).to(token_embeddings.dtype)
        summed = (token_embeddings * mask).sum(dim=1, dtype=acc_dtype)
        counts = torch.clamp(mask.sum(dim=1, dtype=acc_dtype), min=1e-9)
        denominator = counts if mode == "mean" else torch.sqrt(counts)
        return (summed / denominator).to(token_embeddings.dtype)
    if mode == "weightedmean":
        mask = attention_mask.unsqueeze(-1).to(acc_dtype)
        weights = torch.arange(
            1, token_embeddings.shape[1] + 1, device=token_embeddings.device, dtype=acc_dtype
        ).view(1, -1, 1)
        # Position weights start at the first real token, so left padding does not shift them.
        weights = weights - attention_mask.to(torch.int32).argmax(dim=1).view(-1, 1, 1)
        weighted = mask * weights
        summed = (token_embeddings * weighted).sum(dim=1)
        return (summed / torch.clamp(weighted.sum(dim=1), min=1e-9)).to(token_embeddings.dtype)
    if mode == "lasttoken":
        seq_len, dim = token_embeddings.shape[1], token_embeddings.shape[2]
        # The last attended position, for right or left padding alike.
        values, flipped = attention_mask.flip(1).max(1)
        flipped = torch.where(values == 0, seq_len - 1, flipped)
        index = (seq_len - flipped - 1).view(-1, 1, 1).expand(-1, 1, dim)
        masked = token_embeddings * attention_mask.unsqueeze(-1).to(token_embeddings.dtype)
        return torch.gather(masked, 1, index).squeeze(1)
    raise BadRequest(f"pooling mode {mode!r} is not supported")


class EmbeddingEngine:
    """Embeds lists of texts with one loaded model; one batch runs at a time."""

    def __init__(self, loaded: LoadedEncoder, *, max_batch_size: int = 64) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self.loaded = loaded
        self.max_batch_size = max_batch_size
        # The thread lock serialises the model itself (sync callers, and a cancelled aembed
        # whose thread still runs); the per-loop asyncio lock keeps waiting requests off the
        # default executor's threads.
        self._model_lock = threading.Lock()
        self._async_locks: dict[asyncio.AbstractEventLoop, asyncio.Lock] = {}

    @property
    def dimensions(self) -> int:
        return self.loaded.dimensions

    def _check_input(self, texts: Sequence[str]) -> list[str]:
        if isinstance(texts, str):
            texts = [texts]
        out = []
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise BadRequest(f"input[{i}] must be a string, got {type(text).__name__}")
            out.append(text.lower() if self.loaded.do_lower_case else text)
        return out

    def embed(self, texts: Sequence[str]) -> tuple[list[list[float]], int]:
        """The vectors of ``texts`` in order, and the number of tokens read (after truncation)."""
        items = self._check_input(texts)
        if not items:
            return [], 0
        loaded = self.loaded
        if loaded.released or loaded.model is None:
            raise Unavailable(f"embedding model {loaded.source.ref or loaded.source.path} is unloaded")

        # Longest first, as sentence-transformers does: batches of similar lengths pad less.
        order = sorted(range(len(items)), key=lambda i: -len(items[i]))
        vectors: list[list[float]] = [[] for _ in items]
        total_tokens = 0
        with self._model_lock, torch.inference_mode():
            for start in range(0, len(order), self.max_batch_size):
                chunk = order[start : start + self.max_batch_size]
                try:
                    pooled, tokens = self._embed_batch([items[i] for i in chunk])
                except torch.OutOfMemoryError as exc:
                    raise Unavailable(
                        f"out of memory embedding a batch of {len(chunk)} texts on "
                        f"{loaded.device}; retry with fewer inputs"
                    ) from exc
                except (RuntimeError, ValueError) as exc:
                    raise InternalError(f"embedding failed: {exc}") from exc
                total_tokens += tokens
                for row, i in zip(pooled.tolist(), chunk, strict=True):
                    vectors[i] = row
        return vectors, total_tokens

    def _embed_batch(self, texts: list[str]) -> tuple[torch.Tensor, int]:
        loaded = self.loaded
        features = loaded.tokenizer(
            texts,
            padding=True,
            truncation="longest_first",
            max_length=loaded.max_length,
            return_tensors="pt",
        )
        features = {k: v.to(loaded.device) for k, v in features.items()}
        output = loaded.model(**features, return_dict=True)
        token_embeddings = output.last_hidden_state
        mask = features["attention_mask"]
        pooled = pool(token_embeddings, mask, loaded.pooling)
        if loaded.normalize:
            pooled = F.normalize(pooled, p=2, dim=-1)
        return pooled.float().cpu(), int(mask.sum().item())

    async def aembed(self, texts: Sequence[str]) -> tuple[list[list[float]], int]:
        """:meth:`embed` on a worker thread, so the event loop keeps serving other requests."""
        loop = asyncio.get_running_loop()
        lock = self._async_locks.get(loop)
        if lock is None:
            # Drop locks of closed loops (tests run one loop per test).
            self._async_locks = {lp: lk for lp, lk in self._async_locks.items() if not lp.is_closed()}
            lock = self._async_locks.setdefault(loop, asyncio.Lock())
        async with lock:
            return await asyncio.to_thread(self.embed, texts)


if TYPE_CHECKING:  # mypy holds the engine to the protocol the replica uses

    def _is_an_embedder(engine: EmbeddingEngine) -> Embedder:
        return engine
