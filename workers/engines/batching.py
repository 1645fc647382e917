"""The batching engine: the engine core over a left-padded dynamic KV cache, decoded eagerly.

``BatchingEngine`` is :class:`~workers.engines.core.EngineCore` (scheduler, sampler, output
processing, bridge) with :class:`PaddedExecutor`: the running batch lives in one ``DynamicCache``
left-padded to a common length (``kv_padded``), newcomers are merged into it and finished rows are
dropped from it, and each decode step is one eager ``[B, 1]`` forward with per-row
``position_ids`` and the padding mask.

Why not transformers' own continuous batching (``generate_batch``)? On CPU it measured about 10x
slower than a padded static batch for small models; this loop stays close to static-batch speed
(see docs/benchmarks.md).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from .api import (
    Delta,
    Engine,
    EngineClosedError,
    EngineError,
    EngineStats,
    RequestCancelledError,
    SamplingParams,
)
from .bridge import GenerationStream
from .core import DEFAULT_PREFILL_TOKEN_BUDGET, EngineCore
from .kv_padded import PaddedKV, PaddedPrefill
from .request import Request
from .runner import ModelRunner

__all__ = [
    "BatchingEngine",
    "Delta",
    "EngineClosedError",
    "EngineError",
    "EngineStats",
    "GenerationStream",
    "PaddedExecutor",
    "RequestCancelledError",
    "SamplingParams",
]


class PaddedExecutor:
    """The left-padded dynamic cache and its eager decode step (an ``Executor`` of the core)."""

    __slots__ = ("_device", "_kv", "_runner")

    def __init__(self, runner: ModelRunner, max_batch_size: int) -> None:
        self._runner = runner
        self._device = runner.device
        self._kv = PaddedKV(max_batch_size, runner.device)

    def prepare(self) -> None:
        return None

    def release(self) -> None:
        return None

    def prefill(self, reqs: Sequence[Request]) -> PaddedPrefill:
        return self._runner.prefill(
            [r.prompt for r in reqs], all_logits=any(r.params.prompt_logprobs is not None for r in reqs)
        )

    def join(self, first: int, reqs: Sequence[Request], prefill: PaddedPrefill) -> None:
        self._kv.join(first, prefill)

    def decode(self, rows: Sequence[Request]) -> tuple[torch.Tensor, None]:
        step_in = torch.tensor(
            [[r.last_token for r in rows], [r.n_ctx for r in rows]],
            dtype=torch.long,
            device=self._device,
        )
        mask = self._kv.grow(len(rows))
        logits = self._runner.decode(step_in[0].unsqueeze(1), step_in[1].unsqueeze(1), mask, self._kv.cache)
        return logits, None

    def keep(self, rows: list[Request], keep: list[int]) -> list[Request]:
        return self._kv.keep(rows, keep)

    def reset(self) -> None:
        self._kv.reset()


class BatchingEngine(EngineCore):
    """Iteration-level batching over one causal LM with a left-padded dynamic cache (see the
    module doc and ``core.py``)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        max_batch_size: int = 32,
        context_length: int | None = None,
        eos_token_ids: Iterable[int] | None = None,
        prefill_token_budget: int = DEFAULT_PREFILL_TOKEN_BUDGET,
    ) -> None:
        if max_batch_size <= 0:
            raise ValueError(f"max_batch_size must be positive, got {max_batch_size}")
        runner = ModelRunner(model)
        context = runner.context_length(context_length)
        super().__init__(
            runner,
            PaddedExecutor(runner, max_batch_size),
            tokenizer,
            max_batch_size=max_batch_size,
            context_length=context,
            limit_text=f"the context length {context}",
            eos_token_ids=eos_token_ids,
            prefill_token_budget=prefill_token_budget,
        )


if TYPE_CHECKING:  # mypy holds the engine to the protocol the replica uses

    def _is_an_engine(engine: BatchingEngine) -> Engine:
        return engine
