"""Server-sent events: a stream of chunks as ``data: {...}`` events, then ``data: [DONE]``.

The stream is written straight to the ASGI ``send``. While it runs, a watcher reads ``receive``
for the client's ``http.disconnect``: a client that goes away mid-stream cancels the stream's
task, which closes the natserve stream under it, and that tells the replica to stop generating
(a cancel on ``<prefix>.model.<uid>.cancel``). An error after the first event cannot change the
status any more: it goes out as one ``data: {"error": {...}}`` event before ``[DONE]``, which
openai-python and Xinference's client both raise.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

import orjson

from .errors import error_reply

__all__ = ["DONE", "StreamOutcome", "event", "send_events"]

logger = logging.getLogger(__name__)

DONE = b"data: [DONE]\n\n"
_START_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    # Proxies such as nginx would otherwise buffer the events.
    (b"x-accel-buffering", b"no"),
]

Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]


def event(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


class StreamOutcome:
    """How a stream ended: ``"done"``, ``"error"`` (sent as an event) or ``"disconnected"``."""

    __slots__ = ("code", "how")

    def __init__(self, how: str, code: int) -> None:
        self.how = how
        self.code = code


async def _watch(receive: Receive, task: asyncio.Task[Any], gone: list[bool]) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            gone.append(True)
            task.cancel()
            return


async def send_events(
    send: Send,
    receive: Receive,
    chunks: AsyncIterator[Any],
    headers: list[tuple[bytes, bytes]],
) -> StreamOutcome:
    """Send ``chunks`` as events after a 200 with ``headers`` added; close ``chunks`` at the end."""
    task = asyncio.current_task()
    assert task is not None
    gone: list[bool] = []
    watcher = asyncio.create_task(_watch(receive, task, gone))
    outcome = StreamOutcome("done", 200)
    try:
        await send({"type": "http.response.start", "status": 200, "headers": [*_START_HEADERS, *headers]})
        try:
            async for chunk in chunks:
                await send({"type": "http.response.body", "body": event(chunk), "more_body": True})
        except Exception as exc:
            status, body = error_reply(exc)
            outcome = StreamOutcome("error", status)
            await send({"type": "http.response.body", "body": event(body), "more_body": True})
        await send({"type": "http.response.body", "body": DONE, "more_body": False})
    except asyncio.CancelledError:
        if not gone:
            raise
        # Our own cancel, from the watcher: the client left. Nothing more to send.
        task.uncancel()
        outcome = StreamOutcome("disconnected", 499)
    finally:
        watcher.cancel()
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            try:
                await aclose()
            except Exception as exc:
                logger.debug("closing a stream failed: %r", exc)
    return outcome
