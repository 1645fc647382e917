"""The warm-up: the imports every model load needs, done once per process, ahead of the first load.

The imports must not stall the services that run in the same process (``natserve up`` runs the
registry and the worker together, and the worker's own endpoints share its event loop): the
control plane answers within 100 ms at p99 while they run (``bench/startup.py``). Measured on
two cores, three things held the GIL for longer than that, each fixed here:

* the cyclic garbage collector: the imports make about 460,000 objects, and each full collection
  walks all of them, 100-380 ms every two seconds or so. It is off while they run, and what they
  made is frozen (``gc.freeze``: module-level objects live as long as the process) before it is
  on again, so that no later collection walks them either;
* loading torch's shared libraries (libtorch_cpu and its kin, 150-230 ms): CPython loads an
  extension module's libraries with the GIL held, so they are loaded first through ``dlopen``
  called by ctypes, which releases it; the import then finds them loaded;
* what is left takes at most ~60 ms at a time (torch._C's own initialisation, scipy's Cython
  modules, which transformers' losses import when scipy is there).
"""

from __future__ import annotations

import ctypes
import gc
import importlib.util
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["preload_torch_libraries", "set_threads", "warm_up"]

logger = logging.getLogger(__name__)

_warm_lock = threading.Lock()
_warmed = False


def preload_torch_libraries() -> int:
    """Load torch's shared libraries without holding the GIL; how many were loaded (0 where it
    does not apply: not Linux, no torch, torch already imported).

    The libraries torch's import would load, with the flags it would load them with:
    ``libtorch_global_deps`` globally (as ``torch._load_global_deps`` does; on CUDA builds it
    brings the CUDA runtime) and the ``torch._C`` extension with the interpreter's dlopen flags,
    which pulls in libtorch_python, libtorch and libtorch_cpu. The handles stay open, so the
    import's own ``dlopen`` of the same files returns at once.
    """
    if not sys.platform.startswith("linux") or "torch" in sys.modules:
        return 0
    try:
        spec = importlib.util.find_spec("torch")
        if spec is None or spec.origin is None:
            return 0
        root = Path(spec.origin).parent
        try:
            dlopen = ctypes.CDLL(None).dlopen  # glibc 2.34+ has it in libc itself
        except AttributeError:
            dlopen = ctypes.CDLL("libdl.so.2").dlopen
        dlopen.restype = ctypes.c_void_p
        dlopen.argtypes = [ctypes.c_char_p, ctypes.c_int]
        targets = [(root / "lib" / "libtorch_global_deps.so", os.RTLD_NOW | os.RTLD_GLOBAL)]
        targets += [(path, sys.getdlopenflags()) for path in sorted(root.glob("_C.*.so"))]
        loaded = 0
        for path, mode in targets:
            # A foreign call through ctypes releases the GIL for its whole length.
            if path.is_file() and dlopen(os.fsencode(path), mode):
                loaded += 1
        return loaded
    except Exception as exc:  # the import loads them anyway, only with the GIL held
        logger.debug("could not preload torch's libraries: %r", exc)
        return 0


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
    its first launch pays only for the model itself; how it keeps from stalling the services
    meanwhile is in the module's docstring. Every load calls it first, and so waits for a
    warm-up under way: transformers is never imported from two threads at once (a cycle between
    two threads' imports hands one of them a half-initialised module). ``then`` runs after the
    imports and before any load can start.
    """
    global _warmed
    with _warm_lock:
        if _warmed:
            return 0.0
        started = time.perf_counter()
        collecting = gc.isenabled()
        gc.disable()
        try:
            preload_torch_libraries()
            import torch  # noqa: F401
            import transformers.modeling_utils  # noqa: F401
            from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer  # noqa: F401

            if imports is not None:
                imports()
        finally:
            # Before the collector is back: its first pass would walk every object the imports
            # made (at least 100 ms), and so would each full pass after it.
            gc.freeze()
            if collecting:
                gc.enable()
        _warmed = True
        seconds = time.perf_counter() - started
        if then is not None:
            then()
        return seconds


def set_threads(threads: int) -> None:
    """torch's intra-op threads for the whole process (every replica of a worker shares them)."""
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
        logger.info("torch uses %d intra-op threads", threads)
