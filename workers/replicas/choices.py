"""The choices of one reply, built from the engine's deltas: their text, finish reason and token
counts, and the log-probabilities in OpenAI's two shapes.

* a completion's ``logprobs``: ``tokens``, ``token_logprobs``, ``top_logprobs`` (a dict per
  token: the top k alternatives and the sampled token, so up to k + 1 entries, as OpenAI and vLLM
  give them) and ``text_offset`` (where each token starts in the choice's text);
* a chat's ``logprobs.content``: per token ``token``, ``logprob``, ``bytes`` (its UTF-8 bytes;
  a token that holds part of a character has the bytes it stands for) and ``top_logprobs``
  (the top k, most likely first).

A token's text is ``tokenizer.decode([id])``, cached per replica (:class:`TokenTexts`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..engines import Delta
from ..engines.api import TokenLogprob
from ..replies import (
    ChatLogprobsBody,
    CompletionLogprobsBody,
    TokenLogprobEntryBody,
    TopLogprobBody,
)

__all__ = ["ChoiceState", "TokenTexts", "chat_logprobs", "completion_logprobs"]

# Token texts a replica keeps: a vocabulary's worth (SmolLM2: 49,152; Llama 3: 128,256).
_MAX_CACHED = 1 << 18


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, reversed: each character of a token string to its byte."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


_BYTE_DECODER = _byte_decoder()


class TokenTexts:
    """Token id -> (its text, its bytes), cached. Without a tokenizer (the echo engine's words
    are its tokens) a token is its own text."""

    def __init__(self, tokenizer: Any | None) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[Any, tuple[str, list[int]]] = {}

    def get(self, token: Any) -> tuple[str, list[int]]:
        hit = self._cache.get(token)
        if hit is not None:
            return hit
        tokenizer = self._tokenizer
        if tokenizer is None or isinstance(token, str):
            text = str(token)
            raw = list(text.encode("utf-8"))
        else:
            text = tokenizer.decode([token])
            raw = list(text.encode("utf-8"))
            if "\ufffd" in text:
                raw = self._raw_bytes(token) or raw
        if len(self._cache) < _MAX_CACHED:
            self._cache[token] = (text, raw)
        return text, raw

    def _raw_bytes(self, token: int) -> list[int] | None:
        """The bytes of a token that is part of a character: from its byte-level BPE string, or
        a sentencepiece byte token ``<0xE2>``."""
        tokenizer = self._tokenizer
        if tokenizer is None:
            return None
        try:
            piece = tokenizer.convert_ids_to_tokens(token)
        except Exception:
            return None
        if not isinstance(piece, str):
            return None
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            try:
                return [int(piece[3:5], 16)]
            except ValueError:
                return None
        if piece and all(ch in _BYTE_DECODER for ch in piece):
            return [_BYTE_DECODER[ch] for ch in piece]
        return None

    def text(self, token: Any) -> str:
        return self.get(token)[0]


def completion_logprobs(
    tokens: Sequence[Any],
    entries: Sequence[TokenLogprob | None] | None,
    texts: TokenTexts,
    offset: int,
) -> tuple[CompletionLogprobsBody, int]:
    """A completion's ``logprobs`` for ``tokens`` (their entries, None where there is none: the
    first prompt token of an echo), the first starting at ``offset`` characters; and the offset
    after the last."""
    if entries is None:
        entries = [None] * len(tokens)
    words: list[str] = []
    values: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    for token, entry in zip(tokens, entries, strict=False):
        word = texts.text(token)
        words.append(word)
        offsets.append(offset)
        offset += len(word)
        if entry is None:
            values.append(None)
            tops.append(None)
            continue
        values.append(entry.logprob)
        top: dict[str, float] = {}
        for alternative, logprob in entry.top:
            top.setdefault(texts.text(alternative), logprob)
        top.setdefault(word, entry.logprob)
        tops.append(top)
    return {"tokens": words, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}, offset


def chat_logprobs(entries: Sequence[TokenLogprob] | None, texts: TokenTexts) -> ChatLogprobsBody:
    """A chat's ``logprobs`` for these tokens' entries."""
    content: list[TokenLogprobEntryBody] = []
    for entry in entries or ():
        word, raw = texts.get(entry.token_id)
        top: list[TopLogprobBody] = []
        for alternative, logprob in entry.top:
            alt_word, alt_raw = texts.get(alternative)
            top.append({"token": alt_word, "logprob": logprob, "bytes": alt_raw})
        content.append({"token": word, "logprob": entry.logprob, "bytes": raw, "top_logprobs": top})
    return {"content": content}


@dataclass(slots=True)
class ChoiceState:
    """One of the n choices, as its deltas come."""

    index: int
    parts: list[str] = field(default_factory=list)
    token_ids: list[Any] = field(default_factory=list)
    entries: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0
    started: bool = False  # a delta came (a stream's first piece of it went out)
    offset: int = 0  # a stream's text so far, in characters (the next text_offset)

    def add(self, delta: Delta, *, keep: bool) -> None:
        """Takes a delta's text and counts; its tokens and logprobs too when ``keep``."""
        if delta.text:
            self.parts.append(delta.text)
        self.completion_tokens = delta.completion_tokens
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason
        if keep:
            self.token_ids.extend(delta.token_ids)
            if delta.logprobs:
                self.entries.extend(delta.logprobs)

    @property
    def text(self) -> str:
        return "".join(self.parts)
