"""The gateway's own Python per request, in one process and without sockets.

``POST /v1/completions`` through the gateway's ASGI app (``_Inference``), its service, the chat
handle and the client's multiplexer, over a transport that answers each request on the next
turn of the loop with a reply the size of the echo engine's. No uvicorn, no nats-py, no
worker: what is left is the code natserve owns on the gateway's hot path, measured as CPU
seconds per request (``time.process_time``), which ``bench/gateway.py``'s whole-system runs
cannot resolve below a few microseconds. Run it for two trees back to back, alternating.

    python bench/gateway_path.py [--requests 100000] [--concurrency 256] [--label NAME]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import time
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import msgpack  # noqa: E402
import orjson  # noqa: E402

from broker_client._multiplexer import Multiplexer  # noqa: E402
from broker_client._subjects import Subjects  # noqa: E402
from natserve.gateway.app import create_app  # noqa: E402
from natserve.gateway.service import GatewayService  # noqa: E402

PROMPT = "natserve overhead probe " * 4  # bench/gateway.py's
REPLY = msgpack.packb(
    {
        "id": "cmpl-0123456789abcdef",
        "object": "text_completion",
        "created": 1764000000,
        "model": "echo-1",
        "choices": [{"index": 0, "text": PROMPT, "finish_reason": "length", "logprobs": None}],
        "usage": {"prompt_tokens": 16, "completion_tokens": 16, "total_tokens": 32},
    }
)


class _Msg:
    __slots__ = ("data", "headers", "subject")

    def __init__(self, subject: str, data: bytes) -> None:
        self.subject = subject
        self.data = data
        self.headers: dict[str, str] | None = None


class _Sizer:
    max_payload = 1 << 20


class _Answering(Multiplexer):
    """A transport whose every request is answered on the loop's next turn."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__("_INBOX.bench", _Sizer())
        self.loop = loop

    @property
    def is_closed(self) -> bool:
        return False

    async def start(self) -> None:
        return None

    async def publish(self, subject: str, payload: Any, headers: Mapping[str, str] | None = None) -> None:
        return None

    async def subscribe(self, subject: str, handler: Any) -> Any:
        raise NotImplementedError("the benchmark subscribes to nothing")

    async def _send(self, subject: str, token: str, data: bytes, hdrs: dict[str, str] | None) -> None:
        self.loop.call_soon(self._answer, f"{self._prefix}.{token}")

    def _answer(self, subject: str) -> None:
        # _on_reply awaits nothing: run it to its end here, as nats-py's callback task would.
        try:
            self._on_reply(_Msg(subject, REPLY)).send(None)
        except StopIteration:
            pass


class _Client:
    """What a handle and the service use of an AsyncClient."""

    subjects = Subjects()
    timeout = 60.0
    stream_keepalive = None
    url = "nats://127.0.0.1:4222"
    prefix = "natserve"

    def __init__(self, transport: _Answering) -> None:
        self._transport = transport

    async def _get_transport(self) -> _Answering:
        return self._transport


async def _run(requests: int, concurrency: int) -> float:
    transport = _Answering(asyncio.get_running_loop())
    app = create_app(GatewayService(_Client(transport)))  # type: ignore[arg-type]
    body = orjson.dumps({"model": "echo-1", "prompt": PROMPT, "max_tokens": 16})
    headers = [
        (b"host", b"127.0.0.1:9997"),
        (b"content-type", b"application/json"),
        (b"content-length", b"%d" % len(body)),
    ]
    message = {"type": "http.request", "body": body, "more_body": False}

    async def receive() -> dict[str, Any]:
        return message

    async def send(event: Any) -> None:
        if event["type"] == "http.response.start" and event["status"] != 200:
            raise RuntimeError(f"the gateway answered {event['status']}: {event['headers']}")

    async def caller(n: int) -> None:
        for _ in range(n):
            scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": headers}
            await app(scope, receive, send)

    await asyncio.gather(*(caller(200) for _ in range(concurrency)))  # warm-up
    gc.collect()
    gc.freeze()
    each = max(requests // concurrency, 1)
    started = time.process_time()
    await asyncio.gather(*(caller(each) for _ in range(concurrency)))
    return (time.process_time() - started) / (each * concurrency) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--label", default=str(ROOT), help="what to call this tree in the output")
    args = parser.parse_args()
    runner: Callable[[Coroutine[Any, Any, float]], float] = asyncio.run
    try:
        import uvloop  # the standalone gateway's loop (natserve/cli.py)

        runner = uvloop.run
    except ImportError:
        pass
    cpu_us = runner(_run(args.requests, args.concurrency))
    print(f"{args.label}: {cpu_us:.2f} CPU us a request (C = {args.concurrency}, {args.requests} requests)")


if __name__ == "__main__":
    main()
