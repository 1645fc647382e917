"""Incremental detokenisation and stop-string matching for streamed generation.

Two problems make "decode each new token and append" wrong:

* Byte-level BPE (GPT-2, Llama 3, Qwen) and byte-fallback SentencePiece tokens can hold part of a
  UTF-8 character; decoding them alone yields U+FFFD. Text is only released once the bytes so far
  form whole characters.
* Many decoders depend on context (SentencePiece drops the leading space of the first piece), so a
  token is decoded together with a few tokens before it and only the new suffix is kept — the
  prefix_offset/read_offset method of Hugging Face TGI and vLLM.

For fast tokenizers the Rust ``tokenizers.decoders.DecodeStream`` implements that method (about
1 µs a token); other tokenizers use the same method in Python. ``StopMatcher`` then holds back text
that could still grow into a stop string, because a stop string may span several tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

__all__ = ["IncrementalDetokenizer", "StopMatcher"]

logger = logging.getLogger(__name__)

# How many prompt tokens seed the decoder's context: enough for any merge-dependent decoder rule
# (SentencePiece's leading space, byte fallback) and small enough to stay cheap.
_CONTEXT_TOKENS = 6
_REPLACEMENT = "\ufffd"

_DecodeStream: Any
try:  # tokenizers >= 0.21
    from tokenizers.decoders import DecodeStream as _DecodeStream
except ImportError:  # pragma: no cover - older tokenizers
    _DecodeStream = None


class IncrementalDetokenizer:
    """Turns a stream of generated token ids into text chunks that never end inside a character.

    ``step`` returns the text made complete by one more token ("" while a character is still
    incomplete); ``flush`` returns whatever is still held back once generation has ended, so that
    the concatenation of every chunk equals decoding the whole completion.
    """

    __slots__ = (
        "_backend",
        "_ids",
        "_prefix_offset",
        "_prefix_text",
        "_read_offset",
        "_stream",
        "_tokenizer",
    )

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int]) -> None:
        context = list(prompt_ids[-_CONTEXT_TOKENS:])
        self._tokenizer = tokenizer
        self._backend = getattr(tokenizer, "backend_tokenizer", None)
        # Every id since the last released chunk, preceded by the context that decodes them.
        self._ids: list[int] = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._prefix_text: str | None = None
        self._stream: Any = None
        if self._backend is not None and _DecodeStream is not None:
            self._stream = _DecodeStream(ids=context, skip_special_tokens=True)

    def _decode(self, ids: Sequence[int]) -> str:
        if self._backend is not None:
            return str(self._backend.decode(list(ids), skip_special_tokens=True))
        return str(
            self._tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)
        )

    def step(self, token_id: int) -> str:
        self._ids.append(token_id)
        if self._stream is not None:
            chunk = self._stream.step(self._backend, token_id)
            if chunk is None:
                return ""
            # The Rust stream has consumed everything so far; keep only a little context for
            # ``flush``, which has to decode any tail the stream still holds back.
            self._prefix_offset = 0
            del self._ids[: max(0, len(self._ids) - _CONTEXT_TOKENS)]
            self._read_offset = len(self._ids)
            return str(chunk)
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        text = self._decode(self._ids[self._prefix_offset :])
        if len(text) > len(self._prefix_text) and not text.endswith(_REPLACEMENT):
            chunk = text[len(self._prefix_text) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            self._prefix_text = None
            if self._prefix_offset > 4 * _CONTEXT_TOKENS:
                # Trim ids nobody will decode again so long completions stay O(1) per token.
                drop = self._prefix_offset
                del self._ids[:drop]
                self._prefix_offset -= drop
                self._read_offset -= drop
            return chunk
        return ""

    def flush(self) -> str:
        """Text still held back (e.g. a character whose last byte never came), decoded as is."""
        if self._read_offset >= len(self._ids):
            return ""
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        text = self._decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        self._prefix_text = None
        return text[len(prefix) :]


class StopMatcher:
    """Finds stop strings in streamed text, withholding any tail that could begin one."""

    __slots__ = ("_held", "_stops")

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._held = ""

    def feed(self, text: str, *, final: bool = False) -> tuple[str, bool]:
        """Returns ``(text that may be released, whether a stop string was found)``.

        On a match the released text ends right before the earliest stop string and the rest is
        discarded. ``final`` releases the held-back tail too (generation ended another way).
        """
        buf = self._held + text
        if not buf:
            return "", False
        hit = -1
        for stop in self._stops:
            i = buf.find(stop)
            if i >= 0 and (hit < 0 or i < hit):
                hit = i
        if hit >= 0:
            self._held = ""
            return buf[:hit], True
        if final:
            self._held = ""
            return buf, False
        keep = 0
        for stop in self._stops:
            # Longest suffix of ``buf`` that is a proper prefix of ``stop``.
            for k in range(min(len(stop) - 1, len(buf)), keep, -1):
                if buf.endswith(stop[:k]):
                    keep = k
                    break
        if keep:
            self._held = buf[-keep:]
            return buf[:-keep], False
        self._held = ""
        return buf, False
