"""What the gateway does, over one natserve ``AsyncClient``: it knows no HTTP.

Each operation takes a decoded JSON body (or the path's names) and returns what the HTTP layer
sends back: a dict, ``None``, or for a stream an async iterator of chunk dicts. Errors are
natserve's exceptions (and :class:`~natserve.gateway.errors.InvalidField` for a body's field);
:mod:`natserve.gateway.errors` turns them into OpenAI error objects.

The inference operations keep one model handle per uid (a handle holds only its subjects), so a
request costs the translation of its body and the handle's own request, nothing more: no
``describe`` per request. An unknown uid is a 404 from the handle itself ("model 'x' is not
running"), and a model without the ability asked for is a 400 from its worker.

The pool page needs the registry's raw ``workers.list`` reply (its ``recent_failures`` too),
which ``AsyncClient.list_workers`` does not return: it asks on a second connection of its own,
through ``broker_client.runtime``, opened on the first page view.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from broker_client import (
    AsyncChatModelHandle,
    AsyncClient,
    AsyncEmbeddingModelHandle,
    AsyncStream,
    BadRequest,
    Unavailable,
)
from broker_client.runtime import NATSConnection, NatsTransport, connect

from ..status import build_status
from .batches import GatewayBatches
from .openai import (
    chat_call,
    completion_call,
    embedding_call,
    encode_embeddings,
    model_entry,
    name_the_field,
    openai_chunks,
)
from .xinference import launch_arguments, register_arguments

__all__ = ["GatewayService", "Reply"]

logger = logging.getLogger(__name__)

Reply = dict[str, Any] | AsyncIterator[dict[str, Any]]

# Handles are cheap, but uids come from callers: bound what a stream of made-up names can hold.
_MAX_HANDLES = 1024
# The pool page's connection gives up on a NATS server that does not answer after this long.
_CONNECT_TIMEOUT = 5.0


class GatewayService:
    """The gateway's operations on the pool that ``client`` reaches.

    ``nats_options`` are the options ``client`` was made with (credentials, TLS): the pool
    page's own connection uses them too.
    """

    def __init__(self, client: AsyncClient, *, nats_options: dict[str, Any] | None = None) -> None:
        self.client = client
        self._nats_options = dict(nats_options or {})
        self._llms: dict[str, AsyncChatModelHandle] = {}
        self._embedders: dict[str, AsyncEmbeddingModelHandle] = {}
        self._status_nc: NATSConnection | None = None
        self._status_transport: NatsTransport | None = None
        self._status_lock = asyncio.Lock()
        # /v1/files and /v1/batches (batches.py), on a connection of their own.
        self.batches = GatewayBatches(client, nats_options=self._nats_options)

    async def close(self) -> None:
        await self.batches.close()
        transport, nc = self._status_transport, self._status_nc
        self._status_transport = self._status_nc = None
        if transport is not None:
            await transport.close()
        if nc is not None and not nc.is_closed:
            with contextlib.suppress(Exception):
                await nc.close()

    # ------------------------------------------------------------------ inference

    def _llm(self, uid: str) -> AsyncChatModelHandle:
        handle = self._llms.get(uid)
        if handle is None:
            if len(self._llms) >= _MAX_HANDLES:
                self._llms.clear()
            # The chat handle does generate too; a model without chat says so itself (a 400).
            handle = self._llms[uid] = AsyncChatModelHandle(self.client, uid)
        return handle

    def _embedder(self, uid: str) -> AsyncEmbeddingModelHandle:
        handle = self._embedders.get(uid)
        if handle is None:
            if len(self._embedders) >= _MAX_HANDLES:
                self._embedders.clear()
            handle = self._embedders[uid] = AsyncEmbeddingModelHandle(self.client, uid)
        return handle

    async def complete(self, body: Any, request_id: str) -> Reply:
        """``POST /v1/completions``."""
        uid, prompt, config, include_usage = completion_call(body)
        try:
            reply = await self._llm(uid).generate(prompt, config or None, request_id=request_id)
        except BadRequest as exc:
            named = name_the_field(exc, body)
            if named is None:
                raise
            raise named from exc
        if isinstance(reply, AsyncStream):
            return openai_chunks(reply, include_usage)
        return reply

    async def chat(self, body: Any, request_id: str) -> Reply:
        """``POST /v1/chat/completions``."""
        uid, messages, config, include_usage = chat_call(body)
        try:
            reply = await self._llm(uid).chat(messages, config or None, request_id=request_id)
        except BadRequest as exc:
            named = name_the_field(exc, body)
            if named is None:
                raise
            raise named from exc
        if isinstance(reply, AsyncStream):
            return openai_chunks(reply, include_usage)
        return reply

    async def embed(self, body: Any, request_id: str) -> Reply:
        """``POST /v1/embeddings``."""
        uid, text, base64 = embedding_call(body)
        reply = await self._embedder(uid).create_embedding(text, request_id=request_id)
        return encode_embeddings(reply) if base64 else reply

    # ------------------------------------------------------------------ running models

    async def list_models(self) -> dict[str, Any]:
        """``GET /v1/models``: OpenAI's list, each entry with natserve's description."""
        models = await self.client.list_models()
        return {"object": "list", "data": [model_entry(uid, d) for uid, d in models.items()]}

    async def describe_model(self, uid: str) -> dict[str, Any]:
        """``GET /v1/models/{uid}``: OpenAI's model object on natserve's description."""
        return model_entry(uid, await self.client.describe_model(uid))

    async def launch(self, body: Any, *, wait: bool) -> dict[str, Any]:
        """``POST /v1/models``: Xinference's launch; ``{"model_uid"}`` once ready (or placed)."""
        uid = await self.client.launch_model(**launch_arguments(body, wait=wait))
        return {"model_uid": uid}

    async def terminate(self, uid: str) -> dict[str, Any]:
        """``DELETE /v1/models/{uid}``: OpenAI's deletion object."""
        await self.client.terminate_model(uid)
        self._llms.pop(uid, None)
        self._embedders.pop(uid, None)
        return {"id": uid, "object": "model", "deleted": True}

    # ------------------------------------------------------------------ registrations

    async def register(self, model_type: str, body: Any) -> None:
        """``POST /v1/model_registrations/{model_type}``; Xinference answers ``null``."""
        await self.client.register_model(**register_arguments(model_type, body))

    async def list_registrations(self, model_type: str) -> list[dict[str, Any]]:
        """``GET /v1/model_registrations/{model_type}``: ``[{"model_name", "is_builtin", ...}]``."""
        return await self.client.list_model_registrations(model_type)

    async def get_registration(self, model_type: str, model_name: str) -> dict[str, Any]:
        return await self.client.get_model_registration(model_type, model_name)

    async def unregister(self, model_type: str, model_name: str) -> None:
        await self.client.unregister_model(model_type, model_name)

    # ------------------------------------------------------------------ the pool page

    async def _transport(self) -> NatsTransport:
        if self._status_transport is not None:
            return self._status_transport
        async with self._status_lock:
            if self._status_transport is None:
                try:
                    nc = await asyncio.wait_for(
                        connect(self.client.url, name="natserve-gateway-status", **self._nats_options),
                        _CONNECT_TIMEOUT,
                    )
                except TimeoutError:
                    raise Unavailable(
                        f"cannot reach NATS at {self.client.url} within {_CONNECT_TIMEOUT:g} s"
                    ) from None
                transport = NatsTransport(nc)
                await transport.start()
                self._status_nc, self._status_transport = nc, transport
        return self._status_transport

    async def pool_status(self) -> dict[str, Any]:
        """Workers, devices, replicas and their load, models, recent errors (``natserve status``'s)."""
        transport = await self._transport()
        workers, models = await asyncio.gather(
            transport.request(self.client.subjects.workers_list, {}, timeout=self.client.request_timeout),
            self.client.list_models(),
        )
        return build_status(workers, models)
