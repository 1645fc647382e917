"""Model handles: what ``AsyncClient.get_model(uid)`` returns.

    AsyncGenerateModelHandle   generate()                   LLM without the chat ability
    AsyncChatModelHandle       generate(), chat()           LLM with the chat ability
    AsyncEmbeddingModelHandle  create_embedding()           embedding models

The sync ``Client`` wraps them (``_sync_client``). A handle needs of its client only the
transport, the subjects and the default timeout (``HandleClient``), so it does not import it.

Every request carries a ``request_id`` (a uuid unless the caller gives one) in its body, so one
request can be followed through worker logs. When a caller
gives up on a request (a stream it stops reading or closes, a timeout, a cancelled task), the
handle publishes ``{"request_id": ...}`` on ``<prefix>.model.<uid>.cancel`` so the replica stops
generating for nobody.

Requests carry ``"ack": true``: the replica that takes one first tells the client its
worker id, so when the registry announces that worker dead the request fails at once with a 503
(:class:`Unavailable`) instead of waiting for its timeout. A non-streaming request that fails
with a 503 (its worker died or is stopping) or because the NATS connection dropped is sent once
more, under a new request id, and so most likely reaches another replica; a stream is never
resent (its first chunks are already out), it raises.

A model uid nobody serves (never launched, terminated, every replica gone) makes NATS answer
"no responders"; the handles raise that as :class:`NotFound` ("model 'x' is not running"),
chained to the :class:`NoResponders` it came from, because for a caller an unknown uid is a
missing resource, as in Xinference.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Coroutine, Mapping, Sequence
from typing import Any, Literal, Protocol

from pydantic import ValidationError

from ._client_transport import ClientTransport
from ._definition import format_validation_error
from ._errors import BadRequest, NoResponders, NotFound, RequestTimeout, TransportError, Unavailable
from ._messages import GenerateConfig, check_config_for
from ._subjects import Subjects
from .wire import malformed

__all__ = [
    "AsyncChatModelHandle",
    "AsyncEmbeddingModelHandle",
    "AsyncGenerateModelHandle",
    "AsyncModelHandle",
    "AsyncStream",
    "HandleClient",
    "check_generate_config",
]

logger = logging.getLogger(__name__)

# A random prefix per process and a counter: unique, and far cheaper than a uuid4 per request
# (which reads os.urandom every time).
_ID_PREFIX = uuid.uuid4().hex[:24]
_ID_COUNTER = itertools.count(1)


def _new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_ID_COUNTER):08x}"


_END = object()


def _plain_number(value: Any, low: float, high: float, *, integer: bool) -> bool:
    kind = type(value)
    if kind is int or (kind is float and not integer):
        return bool(low <= value <= high)
    return False


# The keys whose plain values the fast check below takes as they are: (low, high, integer).
_PLAIN_LIMITS: dict[str, tuple[float, float, bool]] = {
    "max_tokens": (1, float("inf"), True),
    "temperature": (0, float("inf"), False),
    "top_k": (0, float("inf"), True),
    "seed": (float("-inf"), float("inf"), True),
}


def _plain_config(config: Mapping[str, Any]) -> bool:
    """Whether ``config`` holds only values the model would take unchanged (checked in well
    under a microsecond per key; pydantic takes a few, on every request)."""
    for key, value in config.items():
        limits = _PLAIN_LIMITS.get(key)
        if limits is not None:
            if not _plain_number(value, *limits[:2], integer=limits[2]):
                return False
        elif key == "stream":
            if type(value) is not bool:
                return False
        elif key == "top_p":
            if not (type(value) in (int, float) and 0 < value <= 1):
                return False
        else:
            return False  # stop lists, None values, unknown keys: the model decides
    return True


def check_generate_config(
    generate_config: Mapping[str, Any] | None, kind: Literal["completion", "chat"] | None = None
) -> dict[str, Any] | None:
    """A ``generate_config`` as the handles send it, checked here so that a typo fails before
    anything is sent, naming the key (a BadRequest); what the wire model would take unchanged
    passes as it is, without pydantic. ``kind`` also checks the keys only one kind of request
    takes (``echo`` a completion, the tools a chat, ``logprobs`` an integer or a boolean)."""
    if generate_config is None:
        return None
    if not isinstance(generate_config, Mapping):
        raise BadRequest(f"generate_config must be a dict, got {type(generate_config).__name__}")
    if _plain_config(generate_config):
        return dict(generate_config)
    try:
        config = GenerateConfig.model_validate(dict(generate_config))
    except ValidationError as exc:
        raise BadRequest(
            f"invalid generate_config: {format_validation_error(exc, 'generate_config')}"
        ) from exc
    if kind is not None:
        try:
            check_config_for(config, kind)
        except ValueError as exc:
            raise BadRequest(f"invalid generate_config: {exc}") from exc
    # by_alias: response_format.json_schema.schema is an alias.
    return config.model_dump(exclude_unset=True, by_alias=True)


def _messages_from_legacy(
    prompt: str | None,
    system_prompt: str | None,
    chat_history: Sequence[Mapping[str, Any]] | None,
) -> list[dict[str, Any]]:
    """Xinference's older ``chat(prompt, system_prompt, chat_history)`` as an OpenAI message list."""
    messages: list[dict[str, Any]] = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    messages.extend(dict(m) for m in chat_history or ())
    if prompt is not None:
        messages.append({"role": "user", "content": prompt})
    return messages


class AsyncStream:
    """The chunks of one streamed reply, as an async iterator.

    Close it (``aclose()``, ``async with``) to stop early: the replica is told to cancel.
    Dropping it unfinished does the same once it is garbage-collected.
    """

    def __init__(
        self,
        chunks: AsyncGenerator[Any, None],
        first: Any,
        request_id: str,
        accepted: list[str] | None = None,
        subject: str = "",
    ) -> None:
        self._chunks = chunks
        self._first = first
        self.request_id = request_id
        self._accepted = accepted if accepted is not None else []
        self._subject = subject

    @property
    def worker_id(self) -> str | None:
        """The worker generating this stream (from its ``Natserve-Accepted``), when known."""
        return self._accepted[-1] if self._accepted else None

    def __aiter__(self) -> AsyncStream:
        return self

    async def __anext__(self) -> dict[str, Any]:
        if self._first is not _END:
            chunk, self._first = self._first, _END
        else:
            chunk = await self._chunks.__anext__()
        if type(chunk) is dict:
            return chunk
        # Not a chunk: the replica is broken, and stopping to read it cancels it.
        await self.aclose()
        raise malformed(self._subject, f"a stream chunk must be an object, got {type(chunk).__name__}")

    async def aclose(self) -> None:
        self._first = _END
        await self._chunks.aclose()

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class HandleClient(Protocol):
    """What a handle uses of its client (``AsyncClient``)."""

    subjects: Subjects
    timeout: float
    # Chunks between a stream's acks (the keepalive), or None for none.
    stream_keepalive: int | None
    # The transport once connected: read directly on each request, a coroutine call less.
    _transport: ClientTransport | None

    async def _get_transport(self) -> ClientTransport: ...


class AsyncModelHandle:
    """Shared plumbing: subjects, request ids, timeouts, cancel on abandon."""

    def __init__(
        self, client: HandleClient, model_uid: str, description: Mapping[str, Any] | None = None
    ) -> None:
        self._client = client
        self.model_uid = model_uid
        self.description: dict[str, Any] = dict(description or {})
        self._subjects: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"<{type(self).__name__} model_uid={self.model_uid!r}>"

    def _subject(self, operation: str) -> str:
        subject = self._subjects.get(operation)
        if subject is None:
            subject = self._subjects[operation] = self._client.subjects.model(self.model_uid, operation)
        return subject

    def _not_running(self, exc: NoResponders) -> NotFound:
        return NotFound(
            f"model {self.model_uid!r} is not running: no replica answers on {exc.subject!r} "
            "(launch it, or check `natserve models`)"
        )

    async def _cancel(self, transport: ClientTransport, request_id: str) -> None:
        try:
            await transport.publish(self._subject("cancel"), {"request_id": request_id})
        except Exception as exc:  # the connection may be the reason the request was abandoned
            logger.debug("could not send cancel for %s: %r", request_id, exc)

    async def _call(
        self, operation: str, body: dict[str, Any], timeout: float | None, request_id: str | None
    ) -> dict[str, Any]:
        request_id = request_id or _new_request_id()
        subject = self._subject(operation)
        budget = self._client.timeout if timeout is None else timeout
        deadline = time.monotonic() + budget
        # No headers: the body says it all (nats-py builds and parses headers key by key, which
        # cost both ends more than the rest of a small request's messaging).
        body["ack"] = True
        for attempt in (1, 2):
            body["request_id"] = request_id
            transport = self._client._transport or await self._client._get_transport()
            try:
                reply = await transport.request(
                    subject,
                    body,
                    timeout=max(deadline - time.monotonic(), 0.001) if attempt > 1 else budget,
                )
                if type(reply) is dict:
                    return reply
                raise malformed(subject, f"the reply must be an object, got {type(reply).__name__}")
            except NoResponders as exc:
                raise self._not_running(exc) from exc
            except (RequestTimeout, asyncio.CancelledError):
                # The replica would otherwise finish a generation nobody reads.
                await asyncio.shield(self._cancel(transport, request_id))
                raise
            except (Unavailable, TransportError) as exc:
                if attempt > 1 or transport.is_closed or deadline - time.monotonic() <= 0:
                    raise
                if isinstance(exc, TransportError):
                    # The replica may still be generating: stop it (sent once reconnected).
                    await asyncio.shield(self._cancel(transport, request_id))
                logger.info("%s on %r failed (%s); sending it once more", request_id, subject, exc)
                request_id = f"{request_id[:120]}-retry"
        raise AssertionError("unreachable")

    async def _stream(
        self, operation: str, body: dict[str, Any], timeout: float | None, request_id: str | None
    ) -> AsyncStream:
        request_id = request_id or _new_request_id()
        body["request_id"] = request_id
        body["ack"] = True
        every = self._client.stream_keepalive
        if every is not None:
            body["keepalive"] = every
        transport = await self._client._get_transport()

        async def on_abandon() -> None:
            await self._cancel(transport, request_id)

        accepted: list[str] = []
        subject = self._subject(operation)
        chunks = transport.stream(
            subject,
            body,
            timeout=self._client.timeout if timeout is None else timeout,
            on_abandon=on_abandon,
            on_accept=accepted.append,
        )
        # Wait for the first chunk here, so that an unknown uid or a bad request raises from
        # the call itself rather than from the first iteration.
        try:
            first = await chunks.__anext__()
        except StopAsyncIteration:
            first = _END
        except NoResponders as exc:
            raise self._not_running(exc) from exc
        except BaseException:
            await chunks.aclose()
            raise
        return AsyncStream(chunks, first, request_id, accepted, subject)

    async def _generation(
        self,
        operation: str,
        body: dict[str, Any],
        generate_config: Mapping[str, Any] | None,
        timeout: float | None,
        request_id: str | None,
    ) -> dict[str, Any] | AsyncStream:
        """Send a generate or chat ``body`` with its checked config: streamed when it asks."""
        config = check_generate_config(generate_config, "chat" if operation == "chat" else "completion")
        return await self._send_checked(operation, body, config, timeout, request_id)

    def _send_checked(
        self,
        operation: str,
        body: dict[str, Any],
        config: dict[str, Any] | None,
        timeout: float | None,
        request_id: str | None,
    ) -> Coroutine[Any, Any, dict[str, Any] | AsyncStream]:
        """Send a generate or chat ``body`` whose ``config`` is what :func:`check_generate_config`
        returned for it (a fresh dict the handle may keep), without checking it again: the
        gateway's entry point, which checks a body's config itself to name the HTTP field. The
        caller has also checked ``body`` as ``generate`` / ``chat`` would (a prompt string; a
        non-empty list of message dicts, not copied). A plain function returning the request's
        coroutine: one coroutine frame less per request."""
        if config is not None:
            body["generate_config"] = config
            if config.get("stream"):
                return self._stream(operation, body, timeout, request_id)
        return self._call(operation, body, timeout, request_id)


class AsyncGenerateModelHandle(AsyncModelHandle):
    """An LLM: ``generate``."""

    async def generate(
        self,
        prompt: str,
        generate_config: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> dict[str, Any] | AsyncStream:
        """A completion dict, or with ``{"stream": True}`` an async iterator of chunk dicts."""
        if not isinstance(prompt, str):
            raise BadRequest(f"prompt must be a string, got {type(prompt).__name__}")
        return await self._generation("generate", {"prompt": prompt}, generate_config, timeout, request_id)


class AsyncChatModelHandle(AsyncGenerateModelHandle):
    """An LLM with the chat ability: ``generate`` and ``chat``."""

    async def chat(
        self,
        messages: Sequence[Mapping[str, Any]] | str | None = None,
        generate_config: Mapping[str, Any] | None = None,
        *,
        prompt: str | None = None,
        system_prompt: str | None = None,
        chat_history: Sequence[Mapping[str, Any]] | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> dict[str, Any] | AsyncStream:
        """A ``chat.completion`` dict, or with ``{"stream": True}`` an async iterator of chunks.

        ``messages`` is the OpenAI list. Xinference's older form, ``chat(prompt, system_prompt=...,
        chat_history=...)``, is accepted too (a string first argument is the prompt). ``tools``
        (OpenAI's list) is ``generate_config["tools"]``, as Xinference's client takes it.
        """
        if tools is not None:
            if generate_config is not None and "tools" in generate_config:
                raise BadRequest("tools given twice: as tools= and in generate_config")
            generate_config = {**(generate_config or {}), "tools": list(tools)}
        if isinstance(messages, str):
            prompt, messages = messages, None
        if messages is None:
            if prompt is None:
                raise BadRequest("chat needs messages (or the older prompt=...)")
            message_list = _messages_from_legacy(prompt, system_prompt, chat_history)
        else:
            if prompt is not None or system_prompt is not None or chat_history is not None:
                raise BadRequest("give either messages or prompt/system_prompt/chat_history, not both")
            message_list = [dict(m) for m in messages]
        if not message_list:
            raise BadRequest("messages must hold at least one message")
        body = {"messages": message_list}
        return await self._generation("chat", body, generate_config, timeout, request_id)


class AsyncEmbeddingModelHandle(AsyncModelHandle):
    """An embedding model: ``create_embedding``."""

    async def create_embedding(
        self,
        input: str | Sequence[str],
        *,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> dict[str, Any]:
        """``{"object": "list", "data": [{"embedding": [...], "index": i}, ...], "model", "usage"}``."""
        if not isinstance(input, str):
            input = list(input)
            if not input:
                raise BadRequest("input must hold at least one string")
        return await self._call("embed", {"input": input}, timeout, request_id)
