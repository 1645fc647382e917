"""Bounded waits: every wait in the tests has a bound and says what it waited for.

``within`` bounds one awaitable. ``eventually`` polls a probe until it returns something truthy;
the two flavours differ in what a probe's exception means:

- ``eventually``: a bug, raised at once (the registry and worker tests, where every probe is a
  request that must succeed);
- ``eventually_despite_errors``: "not yet" (the pool tests, where a server restarts or a process
  is not up yet); the last error is shown when time runs out.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

TIMEOUT = 30.0


async def within(awaitable: Awaitable[T], what: str, timeout: float = TIMEOUT) -> T:
    """Await ``awaitable`` for at most ``timeout`` seconds, failing the test naming ``what``."""
    try:
        return await asyncio.wait_for(awaitable, timeout)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout:g} s waiting for {what}") from None


async def eventually(
    probe: Callable[[], Awaitable[T | None]], what: str, timeout: float = TIMEOUT, interval: float = 0.02
) -> T:
    """Poll ``probe`` until it returns something truthy; fail naming ``what`` after ``timeout``.

    An exception from the probe fails at once.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = await probe()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        # Bounded polling of an observable state, not a sleep standing in for a barrier.
        await asyncio.sleep(interval)


async def eventually_despite_errors(
    probe: Callable[[], Awaitable[T | None]], what: str, timeout: float = TIMEOUT, interval: float = 0.05
) -> T:
    """As ``eventually``, but an exception from the probe counts as "not yet" (a server
    restarting, a worker not seen yet), and the last one is shown when time runs out."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            result = await probe()
            if result:
                return result
        except Exception as exc:
            last = exc
        if time.monotonic() > deadline:
            why = f" (last error: {last!r})" if last is not None else ""
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}{why}")
        # Bounded polling of an observable state, not a sleep standing in for a barrier.
        await asyncio.sleep(interval)


def eventually_blocking(
    probe: Callable[[], T | None], what: str, timeout: float = TIMEOUT, interval: float = 0.1
) -> T:
    """``eventually_despite_errors`` for synchronous tests: polls ``probe`` in this thread."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            result = probe()
            if result:
                return result
        except Exception as exc:
            last = exc
        # Bounded polling of an observable state, not a sleep standing in for a barrier.
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what} (last error: {last!r})")
