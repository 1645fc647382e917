"""Helpers of the engine tests: collecting a stream with bounded waits, prompts of different
lengths, transformers' own greedy output as the reference, and a stop string that spans tokens.
Every wait is bounded by ``asyncio.wait_for``; nothing sleeps to synchronise."""

from __future__ import annotations

import asyncio
import functools
import random
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from workers.engines.api import Delta, SamplingParams

__all__ = [
    "GREEDY",
    "TIMEOUT",
    "Result",
    "collect",
    "next_delta",
    "prompts_of",
    "reference",
    "split_stop",
]

TIMEOUT = 20.0  # generous bound for any single wait; a hang fails instead of blocking CI
GREEDY = functools.partial(SamplingParams, temperature=0)


@dataclass
class Result:
    deltas: list[Delta] = field(default_factory=list)

    @property
    def ids(self) -> list[int]:
        return [t for d in self.deltas for t in d.token_ids]

    @property
    def text(self) -> str:
        return "".join(d.text for d in self.deltas)

    @property
    def last(self) -> Delta:
        return self.deltas[-1]


async def collect(stream: AsyncIterator[Delta], timeout: float = TIMEOUT) -> Result:
    result = Result()

    async def drain() -> None:
        async for delta in stream:
            result.deltas.append(delta)

    try:
        await asyncio.wait_for(drain(), timeout)
    except TimeoutError:
        pytest.fail(f"generation did not finish within {timeout}s; got {len(result.ids)} tokens")
    return result


async def next_delta(stream: AsyncIterator[Delta], what: str) -> Delta:
    try:
        return await asyncio.wait_for(anext(stream), TIMEOUT)
    except TimeoutError:
        pytest.fail(f"no Delta for {what} within {TIMEOUT}s")


def reference(model: Any, prompt: Sequence[int], max_tokens: int, eos: int | None) -> list[int]:
    """Greedy tokens from transformers' own ``generate`` on the prompt alone, up to and including
    the first eos (the engine counts the eos token as generated, too)."""
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([list(prompt)]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=max_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=model.generation_config.pad_token_id,
        )
    new = out[0, len(prompt) :].tolist()
    if eos is not None and eos in new:
        new = new[: new.index(eos) + 1]
    return new


def prompts_of(tokenizer: Any, n: int, seed: int = 0) -> list[list[int]]:
    """``n`` prompts of clearly different lengths, some with multi-byte characters."""
    rng = random.Random(seed)
    words = "the a of water café 日本 people write look über 🙂 day number sound".split()
    out = []
    for i in range(n):
        text = " ".join(rng.choice(words) for _ in range(1 + (i * 7) % 23))
        out.append(tokenizer(text).input_ids)
    return out


def split_stop(tokenizer: Any, ids: list[int]) -> tuple[str, int]:
    """A stop string made of the end of one token's text and the start of the next one's, and
    how many tokens it takes until the decoded text contains it."""
    pieces = [tokenizer.decode([t]) for t in ids]
    for k in range(2, len(ids) - 1):
        a, b = pieces[k], pieces[k + 1]
        if not (a.isascii() and b.isascii() and len(a) >= 2 and len(b) >= 2):
            continue
        stop = a[-2:] + b[:1]
        if any(stop in p for p in pieces):
            continue
        for n in range(1, len(ids) + 1):
            if stop in tokenizer.decode(ids[:n], skip_special_tokens=True):
                return stop, n
    raise AssertionError(f"no token pair suited a split stop string in {pieces}")
