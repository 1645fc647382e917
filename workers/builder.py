"""One launch, from a ``WorkerLaunch`` to a replica ready to serve: which engine, on what, loaded how.

:func:`build_replica` is the one place that chooses:

* a spec whose ``model_uri`` starts with ``echo:``: the model-less
  :class:`~workers.engines.EchoEngine`, shaped by the URI's options (``load=N`` makes the launch
  take N seconds, reported as ``loading`` progress and cancellable like a real load; ``delay``
  and ``slots`` shape the engine, ``slots`` being the replica's batch capacity);
* an LLM on a CUDA device: :class:`~workers.engines.StaticBatchingEngine` (static KV slots, one
  CUDA graph per batch-size bucket);
* an LLM on the CPU: :class:`~workers.engines.StaticBatchingEngine` too, eagerly, its slots
  starting at :data:`CPU_INITIAL_SEQ` positions and growing with the longest row; with
  ``WorkerSettings(cpu_kv="padded")`` :class:`~workers.engines.BatchingEngine` (a left-padded
  dynamic cache);
* an embedding model: :class:`~workers.engines.EmbeddingEngine`;
* a ``ggufv2`` spec: :class:`~workers.engines.LlamaCppEngine` (llama.cpp's parallel sequences,
  on the CPU), its file found by :func:`workers.loading.resolve_gguf`; a worker without
  llama-cpp-python answers with a 503 naming ``pip install 'natserve[gguf]'``.

A real model is resolved (:mod:`workers.loading.sources`, downloading with ``download``
progress), then loaded on a thread (``loading``), so that the worker keeps answering meanwhile.
A :class:`PendingLaunch` is the launch while it runs: shown in heartbeats, and where a terminate
reaches it; a launch cancelled that way ends with a 503 and leaves nothing loaded behind.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from broker_client import (
    BadRequest,
    EmbeddingDefinition,
    LLMDefinition,
    ModelSpec,
    ReplicaInfo,
    Unavailable,
    WorkerLaunch,
)

from .devices import free_memory
from .engines import EchoEngine, echo_options, is_echo_uri
from .replicas import EmbeddingReplica, LLMReplica, Replica
from .settings import WorkerSettings

__all__ = [
    "CPU_INITIAL_SEQ",
    "DEFAULT_EMBEDDING_BATCH",
    "DEFAULT_LLM_BATCH",
    "PendingLaunch",
    "build_replica",
    "cpu_engine",
    "warm_up",
]

logger = logging.getLogger(__name__)

DEFAULT_LLM_BATCH = 32
DEFAULT_EMBEDDING_BATCH = 64
# Positions per slot the CPU's static KV slots start with (they double as rows need, up to the
# context): 32 slots of SmolLM2-135M at 256 positions are 360 MiB in fp32, where the whole
# context (8192) would be 11 GiB. registry_service.memory counts the same number.
CPU_INITIAL_SEQ = 256
# How often a slow echo load reports progress and looks for a cancel.
_LOAD_TICK = 0.1

# Publishes one progress event of the launch (a ModelEvent's stage and fields).
EventSink = Callable[..., Awaitable[None]]


def warm_up(then: Callable[[], None] | None = None) -> float:
    """The loader's warm-up (:func:`workers.loading.warm_up`), the LLM engine's module included:
    what every launch of a model imports, once per process; the seconds it took."""
    from . import loading

    return loading.warm_up(then, imports=_import_engine)


def _import_engine() -> None:
    from .engines import BatchingEngine  # noqa: F401


@dataclass
class PendingLaunch:
    """A replica being loaded: shown in heartbeats, and where a terminate can reach it."""

    launch: WorkerLaunch
    device: str
    # Set when a terminate or the worker's shutdown ends the launch; the 503's reason.
    cancelled: str | None = None

    def info(self) -> ReplicaInfo:
        return ReplicaInfo(
            model_uid=self.launch.model_uid,
            replica_index=self.launch.replica_index,
            model_name=self.launch.model_name,
            model_type=self.launch.model_type,
            device=self.device,
            status="loading",
        )

    def check(self) -> None:
        """A 503 if the launch was cancelled meanwhile."""
        if self.cancelled:
            launch = self.launch
            raise Unavailable(
                f"launch of replica {launch.replica_index} of {launch.model_uid!r}: {self.cancelled}"
            )


def on_own_thread(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> asyncio.Future[Any]:
    """``asyncio.to_thread`` on a thread started for the call, which ends with it.

    For the torch work of a launch (loading, the engine's probe forward). Each thread that runs
    an OpenMP parallel region keeps a team of its own (one more OpenMP thread per core) for as
    long as it lives, and once a process's OpenMP threads outnumber its cores libgomp spins only
    its "throttled" count (100 turns, 0 under ``PASSIVE``) instead of ``GOMP_SPINCOUNT`` or the
    policy's. On the long-lived threads of the default executor one launch left a second team
    beside the engine thread's: 3 OpenMP threads on 2 cores, and an operator's
    ``OMP_WAIT_POLICY`` / ``GOMP_SPINCOUNT`` no longer reached the engine (its OpenMP thread
    slept ~100 times a request under either; measured on the tiny model, 2026-12-04). A thread
    that ends frees its team. The context is copied, as ``to_thread`` does.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()
    context = contextvars.copy_context()

    def settle(ok: bool, value: Any) -> None:
        if future.done():  # the awaiting task was cancelled meanwhile
            return
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)

    def run() -> None:
        try:
            outcome = (True, context.run(fn, *args, **kwargs))
        except BaseException as exc:
            outcome = (False, exc)
        try:
            loop.call_soon_threadsafe(settle, *outcome)
        except RuntimeError:  # the loop is closed: nobody waits for the result any more
            pass

    threading.Thread(target=run, name=f"natserve-{getattr(fn, '__name__', 'load')}", daemon=True).start()
    return future


async def build_replica(
    pending: PendingLaunch,
    definition: LLMDefinition | EmbeddingDefinition,
    spec: ModelSpec,
    *,
    settings: WorkerSettings,
    event: EventSink,
    spawn: Callable[[Awaitable[Any]], None],
    on_first_token: Callable[[float], None] | None = None,
    on_warm: Callable[[], None] | None = None,
) -> Replica:
    """Load the replica ``pending`` launches; its errors are the loader's (404, 400, 503...).

    ``event(stage, **fields)`` publishes the launch's progress; ``spawn`` runs a coroutine in the
    background (progress from download threads); ``on_warm`` follows the loader's imports when
    this launch does them (no warm-up, or one not over yet).
    """
    launch = pending.launch
    common: dict[str, Any] = {
        "model_uid": launch.model_uid,
        "replica_index": launch.replica_index,
        "model_name": launch.model_name,
        "definition": definition,
        "device": pending.device,
        "request_limits": launch.request_limits,
        "limits": settings.limits.for_replica(
            max_tokens_limit=launch.max_tokens_limit, rate_limit=launch.rate_limit
        ),
        "on_first_token": on_first_token,
    }
    if is_echo_uri(spec.model_uri):
        if not isinstance(definition, LLMDefinition):
            raise BadRequest("model_uri 'echo:' serves LLM models only")
        return await _echo_replica(pending, definition, spec, common, event)
    if spec.model_format == "ggufv2":
        if not isinstance(definition, LLMDefinition):
            raise BadRequest("model_format 'ggufv2' serves LLM models only")
        return await _gguf_replica(pending, definition, spec, common, settings, event, spawn)
    return await _loaded_replica(pending, definition, spec, common, settings, event, spawn, on_warm)


def _progress_sink(
    event: EventSink, spawn: Callable[[Awaitable[Any]], None]
) -> Callable[[dict[str, Any]], None]:
    """A download progress callback (called on download threads) that publishes events."""
    loop = asyncio.get_running_loop()

    def progress(update: dict[str, Any]) -> None:
        total = update.get("total") or 0
        fraction = update.get("bytes", 0) / total if total else None
        loop.call_soon_threadsafe(
            spawn,
            event("download", fraction=fraction, message=f"{update.get('bytes', 0)} of {total} bytes"),
        )

    return progress


async def _gguf_replica(
    pending: PendingLaunch,
    definition: LLMDefinition,
    spec: ModelSpec,
    common: dict[str, Any],
    settings: WorkerSettings,
    event: EventSink,
    spawn: Callable[[Awaitable[Any]], None],
) -> LLMReplica:
    from . import loading

    launch = pending.launch
    if not loading.llama_cpp_available():
        raise Unavailable(
            f"model {launch.model_name!r} is a GGUF model (model_format 'ggufv2'), served by the "
            f"llama.cpp engine, and this worker has no llama-cpp-python: {loading.GGUF_INSTALL}"
        )
    ref = spec.model_uri or spec.model_id
    await event("download", message=f"resolving {ref} ({launch.quantization})")
    cache_dir = settings.cache_dir or os.environ.get("HF_HUB_CACHE") or None
    source = await asyncio.to_thread(
        loading.resolve_gguf,
        spec.model_id,
        spec.model_uri,
        file_name_template=spec.model_file_name_template,
        quantization=launch.quantization,
        revision=spec.model_revision,
        cache_dir=cache_dir,
        progress=_progress_sink(event, spawn),
    )
    pending.check()
    await event("loading", message=f"loading {source.path} with llama.cpp (cpu)")
    loaded = await asyncio.to_thread(
        loading.load_gguf, source, quantization=launch.quantization, what=f"model {launch.model_name!r}"
    )
    try:
        pending.check()
        from .engines import LlamaCppEngine
        from .engines.llama_vocab import GGUFTokenizer

        tokenizer = GGUFTokenizer(loaded.llama_cpp, loaded.vocab, loaded.metadata)
        # The definition's context (2048 unless it says), never more than the model's: every
        # sequence gets KV cells for a whole context, so the model's 8k-128k would take GiBs.
        context = min(definition.context_length, loaded.context_length)
        max_batch_size = launch.max_batch_size or DEFAULT_LLM_BATCH
        engine = LlamaCppEngine(
            loaded.llama_cpp,
            loaded.model,
            tokenizer,
            max_batch_size=max_batch_size,
            context_length=context,
        )
        return LLMReplica(
            engine=engine,
            tokenizer=tokenizer,
            context_length=context,
            max_batch_size=max_batch_size,
            memory_bytes=loaded.file_bytes + engine.kv_bytes,
            loaded=loaded,
            **{**common, "device": "cpu"},
        )
    except BaseException:
        loaded.unload()
        raise


async def _echo_replica(
    pending: PendingLaunch,
    definition: LLMDefinition,
    spec: ModelSpec,
    common: dict[str, Any],
    event: EventSink,
) -> LLMReplica:
    assert spec.model_uri is not None
    try:
        options = echo_options(spec.model_uri)
    except ValueError as exc:
        raise BadRequest(str(exc)) from exc
    if options.load:
        started = time.monotonic()
        while (elapsed := time.monotonic() - started) < options.load:
            pending.check()
            await event("loading", fraction=elapsed / options.load, message="echo engine (simulated load)")
            await asyncio.sleep(min(_LOAD_TICK, options.load - elapsed))
    await event("loading", message="echo engine")
    slots = options.slots or pending.launch.max_batch_size
    engine = EchoEngine(context_length=definition.context_length, delay=options.delay, slots=slots)
    return LLMReplica(
        engine=engine,
        tokenizer=None,
        context_length=definition.context_length,
        max_batch_size=slots,
        **{**common, "memory_bytes": options.memory},
    )


async def _loaded_replica(
    pending: PendingLaunch,
    definition: LLMDefinition | EmbeddingDefinition,
    spec: ModelSpec,
    common: dict[str, Any],
    settings: WorkerSettings,
    event: EventSink,
    spawn: Callable[[Awaitable[Any]], None],
    on_warm: Callable[[], None] | None,
) -> Replica:
    # Looked up here, not imported at the top: the package's names are what a test can replace.
    from . import loading

    launch = pending.launch
    device = pending.device
    # Without a warm-up (or before it is over) the imports happen here, and on_warm follows
    # them before the model is built, as it would have after the warm-up.
    await asyncio.to_thread(warm_up, on_warm)
    if settings.torch_threads is not None:
        loading.set_threads(settings.torch_threads)
    progress = _progress_sink(event, spawn)

    ref = spec.model_uri or spec.model_id
    await event("download", message=f"resolving {ref}")
    # Read at launch time, not import time, like HF_HUB_OFFLINE in the loader.
    cache_dir = settings.cache_dir or os.environ.get("HF_HUB_CACHE") or None
    source = await asyncio.to_thread(
        loading.resolve_source,
        spec.model_id,
        spec.model_uri,
        revision=spec.model_revision,
        cache_dir=cache_dir,
        progress=progress,
    )
    if pending.cancelled:
        raise Unavailable(f"launch of {launch.model_uid!r}: {pending.cancelled}")
    await event("loading", message=f"loading {source.path} on {device}")

    loaded: Any = None
    try:
        if isinstance(definition, LLMDefinition):
            loaded = await on_own_thread(
                loading.load_llm,
                source,
                quantization=launch.quantization,
                device=device,
                # Both switches: the definition asks, the operator allows (checked at launch).
                trust_remote_code=settings.limits.trust_remote_code(definition.trust_remote_code),
                dtype=settings.cpu_dtype if device == "cpu" else None,
            )
            # Building the engine probes the model (a forward): on a thread.
            return await on_own_thread(_llm_replica, launch, definition, loaded, common, settings)
        loaded = await on_own_thread(loading.load_embedding, source, device=device)
        from .engines import EmbeddingEngine

        embedder = EmbeddingEngine(loaded, max_batch_size=launch.max_batch_size or DEFAULT_EMBEDDING_BATCH)
        return EmbeddingReplica(
            engine=embedder,
            dimensions=loaded.dimensions,
            max_length=loaded.max_length,
            memory_bytes=loaded.memory_bytes,
            loaded=loaded,
            **common,
        )
    except BaseException:
        if loaded is not None:
            loaded.unload()
        del loaded
        free_memory(device)
        raise


def cpu_engine(model: Any, tokenizer: Any, *, max_batch_size: int, context: int, kv: str) -> Any:
    """The LLM engine on the CPU: static slots (``kv="slots"``) where the model allows them, else
    (or with ``kv="padded"``) the left-padded dynamic cache."""
    from .engines import BatchingEngine, StaticBatchingEngine

    if kv == "slots":
        # On the CPU the left-padded cache copies every row's K/V at each step (torch.cat: 15%
        # of a SmolLM2-135M step at batch 8) and re-pads on every join; static slots write one
        # position in place and attend over a window up to the longest row.
        try:
            return StaticBatchingEngine(
                model,
                tokenizer,
                max_batch_size=max_batch_size,
                context_length=context,
                max_seq_len=context,
                initial_seq_len=CPU_INITIAL_SEQ,
            )
        except ValueError as exc:
            # A sliding window shorter than the context, or attention that takes no ready mask:
            # the padded cache serves those as before.
            logger.info("static KV slots do not fit this model (%s); using the padded cache", exc)
    return BatchingEngine(model, tokenizer, max_batch_size=max_batch_size, context_length=context)


def _llm_replica(
    launch: WorkerLaunch,
    definition: LLMDefinition,
    loaded: Any,
    common: dict[str, Any],
    settings: WorkerSettings,
) -> LLMReplica:
    from .engines import Engine, StaticBatchingEngine

    context = loaded.context_length
    if "context_length" in definition.model_fields_set:
        # The definition may narrow the model's window (memory), never widen it.
        context = min(context, definition.context_length)
    max_batch_size = launch.max_batch_size or DEFAULT_LLM_BATCH
    engine: Engine
    if loaded.device.type == "cuda":
        # On a GPU kernel launches dominate an ungraphed decode step, so the engine with
        # static KV slots and one CUDA graph per batch-size bucket wins there; on the CPU
        # the left-padded dynamic cache measured as fast and needs no per-slot memory.
        engine = StaticBatchingEngine(
            loaded.model,
            loaded.tokenizer,
            max_batch_size=max_batch_size,
            context_length=context,
            max_seq_len=context,
            capture_at_start=True,
        )
        context = engine.context_length
    else:
        engine = cpu_engine(
            loaded.model, loaded.tokenizer, max_batch_size=max_batch_size, context=context, kv=settings.cpu_kv
        )
        context = engine.context_length
    return LLMReplica(
        engine=engine,
        tokenizer=loaded.tokenizer,
        context_length=context,
        max_batch_size=max_batch_size,
        memory_bytes=loaded.memory_bytes,
        loaded=loaded,
        **common,
    )
