"""What engines and their callers share, without torch: sampling parameters, the pieces of output
(``Delta``), statistics and errors. The worker imports these at start; the engines themselves
(and torch, and transformers) only when a model is loaded or the warm-up gets to them."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "Delta",
    "EngineClosedError",
    "EngineError",
    "EngineStats",
    "RequestCancelledError",
    "SamplingParams",
]


@dataclass(slots=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0  # 0 => greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 => off
    # Same seed + same prompt + same params => same output, whatever else is batched alongside.
    seed: int | None = None
    stop: tuple[str, ...] = ()  # matched on decoded text; the stop string is not returned
    stop_token_ids: tuple[int, ...] = ()  # in addition to the eos ids


@dataclass(slots=True)
class Delta:
    text: str  # newly decoded text since the previous Delta (may be "")
    token_ids: list[int]  # tokens generated since the previous Delta
    finish_reason: str | None  # None while running; "stop" or "length" on the last Delta
    prompt_tokens: int
    completion_tokens: int  # total so far


@dataclass
class EngineStats:
    forward_passes: int  # every model forward (prefill and decode) since start
    running: int  # requests in the batch now
    waiting: int  # submitted, not yet in the batch
    finished: int  # ended with "stop"/"length" or with an error
    cancelled: int
    ttft_last_s: float | None  # time to first token of the last request that got one
    ttft_avg_s: float | None
    generated_tokens: int


class EngineError(RuntimeError):
    """Root of the errors the engine itself raises from a ``generate`` iterator."""


class EngineClosedError(EngineError):
    """The engine was closed (or never started) while the request was pending."""


class RequestCancelledError(EngineError):
    """``BatchingEngine.cancel`` ended this request."""
