"""torch's intra-op threads per decode step on the CPU: one thread for the small steps.

A worker runs OpenMP ``PASSIVE`` (natserve/cli.py): between two parallel regions a team's
threads sleep, and each region wakes them. A decode step of a small model at a small batch is
hundreds of short regions, each paying that wake-up; on one thread there is no team to wake.
Measured on SmolLM2-135M, 2 cores, the lean step (``llama_step.py``), ``PASSIVE``, ms a step
(2026-12-04, load 1-2):

    =========  =========  =========
    bucket     1 thread   2 threads
    =========  =========  =========
    int8, 1    19.4       31.1
    int8, 4    35.4       39.8
    int8, 32   125.6      124.5
    fp32, 1    73.6       62.1
    fp32, 32   249.9      188.8
    =========  =========  =========

8-bit linears stream a quarter of fp32's bytes, so their regions are short enough for the
wake-ups to dominate; fp32's are long enough for the second core's memory bandwidth and
arithmetic to win. :class:`StepThreads` gives the generation thread one thread for the
buckets up to ``single_up_to`` and torch's count otherwise. It sets the OpenMP count of the
calling thread only (libgomp's ``omp_set_num_threads`` is per thread), not torch's
process-wide default that other threads (an embedding engine, a load) start with.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable

import torch

__all__ = ["StepThreads", "int8_single_thread_buckets"]

logger = logging.getLogger(__name__)

# Buckets up to which an 8-bit model's decode step runs on one thread (the table above: one
# thread wins at 1 and 4, is even at 32).
INT8_SINGLE_UP_TO = 4


def _omp_setter() -> Callable[[int], None] | None:
    """libgomp's ``omp_set_num_threads`` (torch's OpenMP build loads it globally), or None."""
    try:
        setter = ctypes.CDLL(None).omp_set_num_threads
    except (AttributeError, OSError):
        return None
    setter.argtypes = [ctypes.c_int]
    setter.restype = None
    return setter  # type: ignore[no-any-return]


def int8_single_thread_buckets(model: object) -> int:
    """``single_up_to`` for ``model``: :data:`INT8_SINGLE_UP_TO` when its linears are torch's
    dynamic int8 ones (the CPU's ``8-bit``), else 0 (every step on torch's threads)."""
    try:
        from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
    except ImportError:  # pragma: no cover
        return 0
    modules = getattr(model, "modules", None)
    if modules is None:
        return 0
    return INT8_SINGLE_UP_TO if any(isinstance(m, DynamicLinear) for m in modules()) else 0


class StepThreads:
    """The generation thread's OpenMP thread count, set per step (see the module doc).

    ``use(bucket)`` before a decode step, ``use_all()`` before a prefill; a call that changes
    nothing costs a comparison. ``active`` is False where there is nothing to switch: one
    thread anyway, no bucket below the limit, or no libgomp to call.
    """

    def __init__(self, single_up_to: int) -> None:
        self.threads = torch.get_num_threads()
        self.single_up_to = int(single_up_to)
        self._set = _omp_setter() if self.threads > 1 and self.single_up_to > 0 else None
        if self.threads > 1 and self.single_up_to > 0 and self._set is None:
            logger.debug("no omp_set_num_threads in the process: decode steps keep %d threads", self.threads)
        # None until the first call: the generation thread's count is torch's until then.
        self._now: int | None = None

    @property
    def active(self) -> bool:
        return self._set is not None

    def use(self, bucket: int) -> None:
        self._apply(1 if bucket <= self.single_up_to else self.threads)

    def use_all(self) -> None:
        self._apply(self.threads)

    def _apply(self, n: int) -> None:
        if self._set is None or n == self._now:
            return
        if self._now is None:
            # torch sets a thread's count at its first parallel op (from its process default);
            # asking for the count does that now, so that it cannot undo ours later.
            torch.get_num_threads()
        self._set(n)
        self._now = n
