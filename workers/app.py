"""Running a worker as a process: start, serve until told to stop, drain, leave.

``run_worker`` is what ``natserve worker`` and ``natserve up`` call; the caller owns the stop
event (and the signal handlers that set it, see :func:`stop_on_signals`), so the same function
serves the CLI, the embedded mode and tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from broker_client import NatsAuth

from .limits import WorkerLimits
from .service import Worker

logger = logging.getLogger(__name__)

__all__ = ["Worker", "run_worker", "stop_on_signals"]


async def run_worker(
    *,
    nats_url: str,
    prefix: str = "natserve",
    device: str | None = None,
    worker_id: str | None = None,
    stop: asyncio.Event,
    ready: asyncio.Event | None = None,
    heartbeat_interval: float = 2.0,
    drain_timeout: float = 30.0,
    cache_dir: str | Path | None = None,
    auth: NatsAuth | None = None,
    limits: WorkerLimits | None = None,
    metrics_registry: Any = None,
    warm_up: bool = False,
    on_warm: Callable[[], None] | None = None,
    warm_up_after: asyncio.Event | None = None,
) -> None:
    """Serve as one worker until ``stop`` is set; then drain (at most ``drain_timeout``) and close.

    ``ready`` is set once the worker answers on its subjects and has sent its first heartbeat.
    ``cache_dir`` is the Hugging Face cache (default: ``HF_HUB_CACHE`` at launch time, else the
    hub's default); ``auth`` the NATS identity and TLS settings; ``limits`` the operator's policy
    (:mod:`workers.limits`); ``metrics_registry`` the prometheus_client ``CollectorRegistry`` its
    metrics go to; ``warm_up`` imports torch and the model-loading code on a thread once the
    worker answers (or once ``warm_up_after`` is set), and then calls ``on_warm`` there (see
    :class:`~workers.service.Worker`).
    """
    worker = Worker(
        nats_url,
        prefix=prefix,
        device=device,
        worker_id=worker_id,
        heartbeat_interval=heartbeat_interval,
        drain_timeout=drain_timeout,
        cache_dir=cache_dir,
        auth=auth,
        limits=limits,
        metrics_registry=metrics_registry,
        warm_up=warm_up,
        on_warm=on_warm,
        warm_up_after=warm_up_after,
    )
    await worker.start()
    try:
        if ready is not None:
            ready.set()
        await stop.wait()
        logger.info("worker %s stopping: draining for at most %.0f s", worker.worker_id, drain_timeout)
    finally:
        # Shielded: a second Ctrl-C (task cancelled) must not leave models half-unloaded.
        await asyncio.shield(worker.stop())


def stop_on_signals(
    stop: asyncio.Event, signals: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)
) -> Callable[[], None]:
    """Set ``stop`` on SIGINT/SIGTERM in the running loop; returns a function that undoes it."""
    loop = asyncio.get_running_loop()
    installed = []
    for sig in signals:
        with contextlib.suppress(NotImplementedError, RuntimeError):  # Windows, non-main thread
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)

    def remove() -> None:
        for sig in installed:
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)

    return remove
