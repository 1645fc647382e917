"""What the gateway does, over one natserve ``AsyncClient``: it knows no HTTP.

Each operation takes a decoded JSON body (or the path's names) and returns what the HTTP layer
sends back: a dict, ``None``, or for a stream an async iterator of chunk dicts. Errors are
natserve's exceptions (and :class:`~natserve.gateway.errors.InvalidField` for a body's field);
:mod:`natserve.gateway.errors` turns them into OpenAI error objects.

The inference operations keep one model handle per uid (a handle holds only its subjects), so a
request costs the translation of its body and the handle's own request, nothing more: no
``describe`` per request. The translation checks a body's ``generate_config`` as the handle
would (``check_generate_config``, to name the HTTP field of a wrong value), so the request goes
to the handle's ``_send_checked``, which does not check it again. An unknown uid is a 404 from
the handle itself ("model 'x' is not running"), and a model without the ability asked for is a
400 from its worker.

The pool page shows the registry's whole ``workers.list`` reply (``AsyncClient.pool_report``:
the workers and the launches that failed lately), as ``natserve status`` does.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from broker_client import (
    AsyncChatModelHandle,
    AsyncClient,
    AsyncEmbeddingModelHandle,
    AsyncStream,
    BadRequest,
)

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


class GatewayService:
    """The gateway's operations on the pool that ``client`` reaches."""

    def __init__(self, client: AsyncClient, *, nats_options: dict[str, Any] | None = None) -> None:
        self.client = client
        self._llms: dict[str, AsyncChatModelHandle] = {}
        self._embedders: dict[str, AsyncEmbeddingModelHandle] = {}
        # /v1/files and /v1/batches (batches.py), on a connection of their own made with the
        # client's NATS options (credentials, TLS).
        self.batches = GatewayBatches(client, nats_options=nats_options)

    async def close(self) -> None:
        await self.batches.close()

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
            # The config is checked already (completion_call): sent as it is, not checked again.
            reply = await self._llm(uid)._send_checked(
                "generate", {"prompt": prompt}, config or None, None, request_id
            )
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
            reply = await self._llm(uid)._send_checked(
                "chat", {"messages": messages}, config or None, None, request_id
            )
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

    async def pool_status(self) -> dict[str, Any]:
        """Workers, devices, replicas and their load, models, recent errors (``natserve status``'s)."""
        report, models = await asyncio.gather(self.client.pool_report(), self.client.list_models())
        return build_status(report, models)
