"""An engine that plays back deltas a test wrote, and a word-level tokenizer for it: the one layer
faked in the replicas' reply-shaping tests, which hold the replica to what it makes of the
engine's ``Delta`` s (n choices, logprobs, tool calls, the echo) without a model. The engines
themselves are tested against transformers in tests/engines."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from workers.engines.api import Delta, EngineStats, SamplingParams, TokenLogprob, check_sampling

__all__ = ["ScriptedEngine", "WordTokenizer", "deltas_of"]


class WordTokenizer:
    """Words as tokens, a fixed vocabulary: id i is ``vocab[i]``; ``decode`` joins with nothing
    (a word carries its own leading space, as byte-level BPE tokens do)."""

    def __init__(self, vocab: Sequence[str]) -> None:
        self.vocab = list(vocab)
        self._ids = {word: i for i, word in enumerate(self.vocab)}
        self.chat_template = None
        self.texts: list[str] = []  # every text encoded, so a test sees the prompts

    def __len__(self) -> int:
        return len(self.vocab)

    def get_vocab(self) -> dict[str, int]:
        return dict(self._ids)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.texts.append(text)
        # Words with their leading space, as byte-level BPE splits them; unknown ones dropped.
        return [self._ids[word] for word in re.findall(r" ?\S+", text) if word in self._ids]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.vocab[i] for i in ids)

    def convert_ids_to_tokens(self, token: int) -> str:
        return self.vocab[token]

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        *,
        chat_template: str,
        tools: list[dict[str, Any]] | None = None,
        tokenize: bool = False,
        add_generation_prompt: bool = True,
    ) -> str:
        """transformers' rendering: the template in jinja2's sandbox, ``tools`` passed as it."""
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        return env.from_string(chat_template).render(
            messages=messages, tools=tools, add_generation_prompt=add_generation_prompt
        )


def deltas_of(
    tokenizer: WordTokenizer,
    words: Sequence[str],
    *,
    prompt_tokens: int,
    index: int = 0,
    finish: str = "stop",
    logprob: Callable[[int], TokenLogprob] | None = None,
) -> list[Delta]:
    """One delta per word of a choice, the last with ``finish``; with ``logprob`` each carries it."""
    ids = [tokenizer.vocab.index(word) for word in words]
    return [
        Delta(
            text=word,
            token_ids=[token],
            finish_reason=finish if i == len(ids) - 1 else None,
            prompt_tokens=prompt_tokens,
            completion_tokens=i + 1,
            index=index,
            logprobs=[logprob(token)] if logprob is not None else None,
        )
        for i, (word, token) in enumerate(zip(words, ids, strict=True))
    ]


@dataclass
class _Playback:
    deltas: list[Delta]
    request_id: str
    position: int = 0

    def __aiter__(self) -> _Playback:
        return self

    async def __anext__(self) -> Delta:
        if self.position >= len(self.deltas):
            raise StopAsyncIteration
        delta = self.deltas[self.position]
        self.position += 1
        return delta

    async def aclose(self) -> None:
        self.position = len(self.deltas)


@dataclass
class ScriptedEngine:
    """Answers each request with ``script(prompt_ids, params)``'s deltas and keeps the params it
    was given (``calls``), so a test sees what the replica asked of the engine."""

    script: Callable[[Sequence[Any], SamplingParams], list[Delta]]
    tokenizer: WordTokenizer | None = None
    context_length: int = 4096
    calls: list[tuple[list[Any], SamplingParams]] = field(default_factory=list)

    @property
    def max_batch_size(self) -> int | None:
        return None

    @property
    def stats(self) -> EngineStats:
        return EngineStats(0, 0, 0, len(self.calls), 0, None, None, 0)

    def start(self) -> None:
        return None

    def close(self) -> None:
        return None

    def generate(
        self,
        prompt_ids: Sequence[Any],
        params: SamplingParams,
        *,
        request_id: str | None = None,
        stream: bool = True,
    ) -> _Playback:
        check_sampling(params)
        self.calls.append((list(prompt_ids), params))
        return _Playback(self.script(prompt_ids, params), request_id or "scripted")

    def cancel(self, request_id: str) -> bool:
        return False

    def encode(self, text: str, *, add_special_tokens: bool = True) -> Sequence[Any]:
        return self.tokenizer.encode(text) if self.tokenizer is not None else text.split()

    def count_tokens(self, text: str) -> int:
        return len(self.encode(text))
