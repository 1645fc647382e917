"""The warm-up: the imports every model load needs, done once per process, ahead of the first load."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

__all__ = ["warm_up"]

_warm_lock = threading.Lock()
_warmed = False


def warm_up(then: Callable[[], None] | None = None, *, imports: Callable[[], None] | None = None) -> float:
    """Import the code every model load runs, once per process; the seconds it took (0 after the
    first call).

    That is torch, transformers' model base class and its auto classes for configs, causal
    LMs, encoders and tokenizers, and what ``imports`` imports (the worker's builder gives the
    engine's module, :func:`workers.builder.warm_up`): ``modeling_utils`` alone pulls in
    ``torch.distributed.tensor``, ``torch._dynamo`` and transformers' loss functions, 1.5-2 s on
    two cores and about 90 % of the first launch of a small model (torch itself another 1-1.5 s;
    this module does not import it at the top, so that a worker answers before it). A worker
    does it on a thread of its own once it answers (``WorkerSettings(warm_up=True)``), so that
    its first launch pays only for the model itself. Every load calls it first, and so waits for a warm-up
    under way: transformers is never imported from two threads at once (a cycle between two
    threads' imports hands one of them a half-initialised module). ``then`` runs after the
    imports and before any load can start.
    """
    global _warmed
    with _warm_lock:
        if _warmed:
            return 0.0
        started = time.perf_counter()
        import torch  # noqa: F401
        import transformers.modeling_utils  # noqa: F401
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer  # noqa: F401

        if imports is not None:
            imports()
        _warmed = True
        seconds = time.perf_counter() - started
        if then is not None:
            then()
        return seconds
