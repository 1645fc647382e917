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

# Tokens beyond max_length a cut prefix must hold, so that the word the cut splits is past the
# tokens the model reads.
_CUT_MARGIN = 8


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
    """Embeds lists of texts with one loaded model; one batch runs at a time.

    Two rules keep one request from holding the model for long (a 1 MB input took 1.5 s, and a
    small request waited 5 s behind four of them):

    * a text is cut before it is tokenised to what its first ``max_length`` tokens can span
      (:meth:`_capped`): the tokenizer would read all of it only to truncate it;
    * :meth:`aembed` takes the model one batch at a time, in turn with the other requests
      waiting (an ``asyncio.Lock`` wakes them in order), rather than for a whole request.
    """

    def __init__(self, loaded: LoadedEncoder, *, max_batch_size: int = 64) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self.loaded = loaded
        self.max_batch_size = max_batch_size
        # The thread lock serialises the model itself (sync callers, and a cancelled aembed
        # whose thread still runs); the per-loop asyncio lock keeps waiting requests off the
        # default executor's threads and hands the model to them in turn, batch by batch.
        self._model_lock = threading.Lock()
        self._async_locks: dict[asyncio.AbstractEventLoop, asyncio.Lock] = {}
        self._chars_per_token: int | None = None

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

    def _char_budget(self) -> int:
        """Characters the first ``max_length`` tokens can span, as a first cut: the longest
        token of the vocabulary (a byte-level token is never shorter than its text) or 100 (a
        WordPiece word that long is one [UNK]), times ``max_length``."""
        if self._chars_per_token is None:
            longest = 16
            try:
                longest = max((len(t) for t in self.loaded.tokenizer.get_vocab()), default=16)
            except Exception:
                logger.debug("no vocabulary to bound a token's characters", exc_info=True)
            self._chars_per_token = max(longest, 100)
        return self.loaded.max_length * self._chars_per_token

    def _capped(self, text: str) -> str:
        """``text`` cut to a prefix that still holds its first ``max_length`` tokens.

        Tokenisers that drop whitespace can spend many characters on few tokens, so the cut is
        checked: a prefix with too few tokens (a margin above ``max_length``, so that the word
        the cut splits is not among the tokens kept) grows four times until it has them or is the
        whole text. Only such texts are tokenised more than once.
        """
        budget = self._char_budget()
        if len(text) <= budget:
            return text
        tokenizer, want = self.loaded.tokenizer, self.loaded.max_length + _CUT_MARGIN
        while budget < len(text):
            prefix = text[:budget]
            if len(tokenizer(prefix, add_special_tokens=False, truncation=False)["input_ids"]) >= want:
                return prefix
            budget *= 4
        return text

    def embed(self, texts: Sequence[str]) -> tuple[list[list[float]], int]:
        """The vectors of ``texts`` in order, and the number of tokens read (after truncation)."""
        items = self._check_input(texts)
        order = self._order(items)
        vectors: list[list[float]] = [[] for _ in items]
        total_tokens = 0
        for start in range(0, len(order), self.max_batch_size):
            chunk = order[start : start + self.max_batch_size]
            rows, tokens = self._embed_chunk([items[i] for i in chunk])
            total_tokens += tokens
            for row, i in zip(rows, chunk, strict=True):
                vectors[i] = row
        return vectors, total_tokens

    @staticmethod
    def _order(items: list[str]) -> list[int]:
        # Longest first, as sentence-transformers does: batches of similar lengths pad less.
        return sorted(range(len(items)), key=lambda i: -len(items[i]))

    def _embed_chunk(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """One batch, under the model lock: its vectors and the tokens read."""
        loaded = self.loaded
        if loaded.released or loaded.model is None:
            raise Unavailable(f"embedding model {loaded.source.ref or loaded.source.path} is unloaded")
        with self._model_lock, torch.inference_mode():
            try:
                pooled, tokens = self._embed_batch([self._capped(t) for t in texts])
            except torch.OutOfMemoryError as exc:
                raise Unavailable(
                    f"out of memory embedding a batch of {len(texts)} texts on "
                    f"{loaded.device}; retry with fewer inputs"
                ) from exc
            except (RuntimeError, ValueError) as exc:
                raise InternalError(f"embedding failed: {exc}") from exc
            return pooled.tolist(), tokens

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
        """:meth:`embed` on worker threads, so the event loop keeps serving other requests, and
        one batch at a time, so that the requests waiting get the model in turn."""
        loop = asyncio.get_running_loop()
        lock = self._async_locks.get(loop)
        if lock is None:
            # Drop locks of closed loops (tests run one loop per test).
            self._async_locks = {lp: lk for lp, lk in self._async_locks.items() if not lp.is_closed()}
            lock = self._async_locks.setdefault(loop, asyncio.Lock())
        items = self._check_input(texts)
        order = self._order(items)
        out: list[list[float]] = [[] for _ in items]
        total_tokens = 0
        for start in range(0, len(order), self.max_batch_size):
            chunk = order[start : start + self.max_batch_size]
            async with lock:
                rows, tokens = await asyncio.to_thread(self._embed_chunk, [items[i] for i in chunk])
            total_tokens += tokens
            for row, i in zip(rows, chunk, strict=True):
                out[i] = row
        return out, total_tokens


if TYPE_CHECKING:  # mypy holds the engine to the protocol the replica uses

    def _is_an_embedder(engine: EmbeddingEngine) -> Embedder:
        return engine
