"""The static engine's decode step compiled by ``torch.compile`` (inductor; its C++ backend on the CPU).

:class:`CompiledStep` wraps a :class:`~workers.engines.static.SlotStep`: the first call of a
bucket traces the step (all layers, the lm head and the argmax) into one graph and compiles it.
The batch size and the attention window are traced as symbols (``dynamic=True``), so one graph
serves every bucket above 1 and every window (dynamo specialises the value 1: batch 1 has a graph
of its own); a step never waits for a recompile once each bucket ran once.
:class:`CompiledRunner` is the bucket runner of ``runner.BucketRunners`` over it.

Inductor caches compiled code on disk (its FX graph cache and AOTAutograd cache, both on by
default in torch 2.13) under ``TORCHINDUCTOR_CACHE_DIR`` (:func:`use_cache_dir`).
:func:`compile_counters` says what a compile did: graphs compiled, and hits and misses of the FX
graph cache.

The worker does not use it (``StaticBatchingEngine(compile_step=True)`` and
``bench/cpu_levers.py --compile`` do). Measured on the 2-core machine while other work loaded it
(docs/benchmarks.md): compiling the decode step of the tiny 2-layer test Llama at start took
340 s for buckets 1 and 4 (two graphs), a second process missed the FX graph cache both times
(363 s), and in fp32 about 88 % of a SmolLM2-135M eager step is in ``aten::mm`` already, which
compiling does not speed up: the part compiling can remove is the other ~12 %.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = ["CompiledRunner", "CompiledStep", "compile_counters", "use_cache_dir"]

logger = logging.getLogger(__name__)

_cache_lock = threading.Lock()


def use_cache_dir(path: str | Path | None) -> None:
    """Points inductor's on-disk caches at ``path`` (created if missing); None keeps inductor's
    default (``/tmp/torchinductor_<user>``). Inductor reads the variable at each compile."""
    if path is None:
        return
    path = Path(path).expanduser()
    with _cache_lock:
        path.mkdir(parents=True, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)


def compile_counters() -> dict[str, int]:
    """Counts since the process started: ``graphs`` (inductor compilations, a cache hit
    included), ``fxgraph_cache_hit``, ``fxgraph_cache_miss``."""
    from torch._dynamo.utils import counters

    inductor = counters["inductor"]
    return {
        "graphs": int(counters["stats"]["unique_graphs"]),
        "fxgraph_cache_hit": int(inductor["fxgraph_cache_hit"]),
        "fxgraph_cache_miss": int(inductor["fxgraph_cache_miss"]),
    }


class CompiledStep:
    """``step(bucket)`` through one ``torch.compile``'d graph (see the module doc)."""

    def __init__(self, step: Callable[..., tuple[torch.Tensor, torch.Tensor]]) -> None:
        # ``step(bucket, window)``; the window is the step's own ``window`` attribute (a
        # SlotStep's, set by its ``load``), passed in so that it is a symbol, not a constant.
        self._step = step
        # dynamic=True: the bucket and the window are symbols of one graph, not a graph each.
        self._compiled: Any = torch.compile(step, dynamic=True, fullgraph=True)
        self.compile_seconds = 0.0
        self._traced: set[int] = set()

    def __call__(self, bucket: int) -> tuple[torch.Tensor, torch.Tensor]:
        window = getattr(self._step, "window", None)
        if bucket in self._traced:
            return self._compiled(bucket, window)  # type: ignore[no-any-return]
        started = time.perf_counter()
        out = self._compiled(bucket, window)
        seconds = time.perf_counter() - started
        self.compile_seconds += seconds
        self._traced.add(bucket)
        logger.info("compiled the batch-%d decode step in %.1f s", bucket, seconds)
        return out  # type: ignore[no-any-return]


class CompiledRunner:
    """The decode step of one bucket through a :class:`CompiledStep`; the first run compiles
    (or finds the graph the other buckets made)."""

    kind = "compiled"

    def __init__(self, bucket: int, step: CompiledStep) -> None:
        self.bucket = bucket
        self.calls = 0
        self._step = step

    def run(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        return self._step(self.bucket)
