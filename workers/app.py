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

from .service import Worker
from .settings import WorkerSettings

logger = logging.getLogger(__name__)

__all__ = ["run_worker", "stop_on_signals"]


async def run_worker(
    settings: WorkerSettings,
    *,
    stop: asyncio.Event,
    ready: asyncio.Event | None = None,
    on_warm: Callable[[], None] | None = None,
    warm_up_after: asyncio.Event | None = None,
) -> None:
    """Serve as one worker until ``stop`` is set; then drain (at most ``settings.drain_timeout``)
    and close.

    ``ready`` is set once the worker answers on its subjects and has sent its first heartbeat.
    ``on_warm`` and ``warm_up_after`` are the warm-up's hooks (see :class:`~workers.service.Worker`).
    """
    worker = Worker(settings, on_warm=on_warm, warm_up_after=warm_up_after)
    await worker.start()
    try:
        if ready is not None:
            ready.set()
        await stop.wait()
        logger.info(
            "worker %s stopping: draining for at most %.0f s", worker.worker_id, settings.drain_timeout
        )
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
