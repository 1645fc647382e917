"""Launching an ``echo:`` replica: no weights, but the options of ``engines/echo.py``.

``load=N`` makes the launch take N seconds, reported as ``loading`` progress and cancellable
like a real load (a terminate while it runs ends it with a 503 and nothing is left behind);
``delay`` and ``slots`` shape the engine, ``slots`` being the replica's batch capacity.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from broker_client import BadRequest, LLMDefinition, ModelSpec, Unavailable, WorkerLaunch

from .engines.echo import EchoEngine, echo_options
from .replica import LLMReplica

__all__ = ["build_echo_replica"]

# How often a slow echo load reports progress and looks for a cancel.
_LOAD_TICK = 0.1


async def build_echo_replica(
    launch: WorkerLaunch,
    definition: LLMDefinition,
    spec: ModelSpec,
    common: dict[str, Any],
    *,
    event: Callable[..., Awaitable[None]],
    cancelled: Callable[[], str | None],
) -> LLMReplica:
    assert spec.model_uri is not None
    try:
        options = echo_options(spec.model_uri)
    except ValueError as exc:
        raise BadRequest(str(exc)) from exc
    if options.load:
        started = time.monotonic()
        while (elapsed := time.monotonic() - started) < options.load:
            why = cancelled()
            if why:
                raise Unavailable(f"launch of replica {launch.replica_index} of {launch.model_uid!r}: {why}")
            await event("loading", fraction=elapsed / options.load, message="echo engine (simulated load)")
            await asyncio.sleep(min(_LOAD_TICK, options.load - elapsed))
    await event("loading", message="echo engine")
    slots = options.slots or launch.max_batch_size
    engine = EchoEngine(context_length=definition.context_length, delay=options.delay, slots=slots)
    return LLMReplica(
        engine=engine,
        tokenizer=None,
        context_length=definition.context_length,
        max_batch_size=slots,
        **common,
    )
