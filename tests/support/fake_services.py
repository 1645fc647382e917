"""Fake natserve services in raw nats-py: responders that speak the wire protocol by hand
(msgpack/JSON bodies, ``Natserve-Seq`` chunks, the empty end message, ``Natserve-Parts``, the
``Nats-Service-Error*`` headers), so that the client's tests pin the protocol, not just agree
with natserve's own runtime. ``FakeNats`` runs them on a loop thread of its own, for sync and
async tests alike."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import msgpack
import nats
from nats.aio.msg import Msg

from broker_client import Subjects

# The README seed's definition (Xinference's client docs): nsql-2B, generate only.
NSQL_2B = {
    "version": 1,
    "context_length": 2048,
    "model_name": "nsql-2B",
    "model_lang": ["en"],
    "model_ability": ["generate"],
    "model_description": "nsql-2B, a text-to-SQL model",
    "model_specs": [
        {
            "model_format": "pytorch",
            "model_size_in_billions": 2,
            "quantizations": ["4-bit", "8-bit", "none"],
            "model_id": "NumbersStation/nsql-2B",
        }
    ],
    "prompt_style": None,
}


def headers_of(msg: Msg) -> dict[str, str]:
    assert msg.headers is not None
    return msg.headers


def is_json(msg: Msg) -> bool:
    """The wire rule: the Content-Type, or without one, JSON when the body starts with { or [."""
    declared = (msg.headers or {}).get("Content-Type")
    if declared:
        return declared == "application/json"
    return msg.data.lstrip()[:1] in (b"{", b"[")


def decode(msg: Msg) -> Any:
    if not msg.data:
        return {}
    if is_json(msg):
        return json.loads(msg.data)
    return msgpack.unpackb(msg.data, raw=False)


def encode_like(msg: Msg, obj: Any) -> tuple[bytes, dict[str, str]]:
    """The body in the request's encoding, as the wire rules say."""
    if is_json(msg):
        return json.dumps(obj).encode(), {"Content-Type": "application/json"}
    return msgpack.packb(obj), {"Content-Type": "application/msgpack"}


Handler = Callable[[nats.NATS, Msg], Coroutine[Any, Any, None]]


class FakeNats:
    """Raw nats-py responders on a loop thread of their own, usable from sync and async tests."""

    def __init__(self, url: str, prefix: str) -> None:
        self.subjects = Subjects(prefix)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.received: dict[str, list[Msg]] = defaultdict(list)
        self._arrived = threading.Condition()
        self.nc: nats.NATS = self.call(nats.connect(url))

    def call(self, coro: Awaitable[Any], timeout: float = 10.0) -> Any:
        async def run() -> Any:
            return await coro

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout)

    def on(self, subject: str, handler: Handler | None = None) -> None:
        """Record every message on ``subject``; answer it with ``handler`` in a task of its own."""

        async def cb(msg: Msg) -> None:
            with self._arrived:
                self.received[subject].append(msg)
                self._arrived.notify_all()
            if handler is not None:
                asyncio.get_running_loop().create_task(handler(self.nc, msg))

        async def subscribe() -> None:
            await self.nc.subscribe(subject, cb=cb)
            await self.nc.flush()

        self.call(subscribe())

    def wait_for(self, subject: str, count: int = 1, timeout: float = 5.0) -> list[Msg]:
        """Block until ``count`` messages arrived on ``subject`` (bounded)."""
        deadline = time.monotonic() + timeout
        with self._arrived:
            while len(self.received[subject]) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"{len(self.received[subject])} of {count} messages on {subject} in {timeout} s"
                    )
                self._arrived.wait(left)
            return list(self.received[subject])

    async def await_for(self, subject: str, count: int = 1, timeout: float = 5.0) -> list[Msg]:
        return await asyncio.to_thread(self.wait_for, subject, count, timeout)

    def settle(self) -> None:
        """A round trip through the server: whatever was published before has been delivered."""
        self.call(self.nc.flush())

    def describe(self, uid: str, model_type: str = "LLM", abilities: list[str] | None = None) -> None:
        description = {
            "model_uid": uid,
            "model_name": "fake",
            "model_type": model_type,
            "model_ability": abilities
            if abilities is not None
            else (["embed"] if model_type == "embedding" else ["generate", "chat"]),
            "replicas": [{"replica_index": 0, "worker_id": "w1", "status": "ready"}],
        }

        async def answer(nc: nats.NATS, msg: Msg) -> None:
            body = decode(msg)
            if body.get("model_uid") == uid:
                data, headers = encode_like(msg, description)
            else:
                error = {"error": {"type": "NotFound", "code": 404, "message": "not running"}}
                data, headers = encode_like(msg, error)
                headers.update({"Nats-Service-Error-Code": "404", "Nats-Service-Error": "not running"})
            await nc.publish(msg.reply, data, headers=headers)

        self.on(self.subjects.models_describe, answer)

    def close(self) -> None:
        self.call(self.nc.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


def completion(text: str, model: str = "m") -> dict[str, Any]:
    return {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1,
        "model": model,
        "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


def chunk(text: str) -> dict[str, Any]:
    return {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1,
        "model": "m",
        "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": None}],
    }


def streamer(pieces: list[str], *, end: bool = True, error: tuple[int, str] | None = None) -> Handler:
    """A fake replica streaming ``pieces``, then an error and/or the empty end message."""

    async def handler(nc: nats.NATS, msg: Msg) -> None:
        seq = 0
        for piece in pieces:
            seq += 1
            data, headers = encode_like(msg, chunk(piece))
            headers["Natserve-Seq"] = str(seq)
            await nc.publish(msg.reply, data, headers=headers)
        if error is not None:
            code, message = error
            data, headers = encode_like(
                msg, {"error": {"type": "InternalError", "code": code, "message": message}}
            )
            headers["Nats-Service-Error-Code"] = str(code)
            headers["Nats-Service-Error"] = message
            headers["Natserve-Seq"] = str(seq + 1)
            await nc.publish(msg.reply, data, headers=headers)
        if end:
            await nc.publish(msg.reply, b"")

    return handler


def replier(obj: Any) -> Handler:
    async def handler(nc: nats.NATS, msg: Msg) -> None:
        data, headers = encode_like(msg, obj)
        await nc.publish(msg.reply, data, headers=headers)

    return handler


async def silent(nc: nats.NATS, msg: Msg) -> None:
    """A replica that takes the request and never answers."""
