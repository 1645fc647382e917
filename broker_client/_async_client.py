"""``AsyncClient``: the asyncio face of natserve, and the core the sync ``Client`` runs.

The methods mirror Xinference's client (``register_model``, ``launch_model``, ``get_model``,
``list_models``, ...) so code written for its custom-model workflow ports by changing the import.

    async with AsyncClient("nats://127.0.0.1:4222") as client:
        await client.register_model(model_type="LLM", model=json.dumps(custom_model))
        uid = await client.launch_model(model_name="nsql-2B")
        await (await client.get_model(uid)).generate("SELECT")

Timeouts: ``timeout`` (default 600 s) bounds generation and launch calls, ``request_timeout``
(default 30 s) the registry's bookkeeping calls; every call takes its own ``timeout=`` too. The
first connection gives up after ``connect_timeout`` (a nats-py option, default 5 s here); later
disconnects are retried by nats-py while calls wait within their own timeouts. Nothing relies on
nats-py's 0.5 s request default.

Other keyword arguments go to nats-py's ``connect()``: credentials and TLS, e.g.
``AsyncClient(url, **connect_options(NatsAuth(user="client", password=...)))``. Given none, a
client of servers on this machine uses the token ``natserve up`` keeps in
``$NATSERVE_HOME/nats.token`` when it is there (``_auth.with_local_token``). With
``transport=`` (a ``ClientTransport``, such as ``MemoryTransport``) the client uses it instead of
connecting to NATS.

Streams ask for the keepalive (``stream_keepalive``, 16 chunks by default; ``None`` turns it
off): the client acknowledges every 16 chunks it hands to the caller, and the replica stops a
stream whose reader went silent (its process gone, an iterator dropped unclosed) within seconds
rather than generating to ``max_tokens`` for nobody.

A reply that breaks the wire rules, or lacks a field the client needs (a launch reply without
its ``model_uid``), raises ``ProtocolError``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from . import codec
from ._auth import with_local_token
from ._bounds import MAX_KEEPALIVE
from ._client_transport import ClientTransport
from ._connect import NATSConnection, connect
from ._definition import format_validation_error, parse_definition
from ._errors import BadRequest, NoResponders, TransportError, Unavailable
from ._handles import AsyncChatModelHandle, AsyncEmbeddingModelHandle, AsyncGenerateModelHandle
from ._keepalive import DEFAULT_EVERY as DEFAULT_KEEPALIVE
from ._messages import LaunchRequest
from ._nats_transport import NatsTransport
from ._progress import LaunchFollower, ProgressCallback, make_progress
from ._subjects import DEFAULT_PREFIX, Subjects, check_name
from .wire import malformed

__all__ = ["DEFAULT_URL", "AsyncClient"]

logger = logging.getLogger(__name__)

DEFAULT_URL = "nats://127.0.0.1:4222"
# A launch that waits is bounded by the registry with the call's timeout; the client waits a
# little longer so the registry's own (more telling) timeout error arrives first.
_LAUNCH_MARGIN = 5.0
# The first connect gives up after this long unless ``connect_timeout=`` says otherwise.
_CONNECT_TIMEOUT = 5.0

_ENCODINGS = {
    "msgpack": codec.MSGPACK,
    "json": codec.JSON,
    codec.MSGPACK: codec.MSGPACK,
    codec.JSON: codec.JSON,
}

AsyncHandle = AsyncChatModelHandle | AsyncGenerateModelHandle | AsyncEmbeddingModelHandle


def _model_type_of(description: Mapping[str, Any]) -> str:
    return str(description.get("model_type") or description.get("type") or "LLM")


def _abilities_of(description: Mapping[str, Any]) -> list[str]:
    abilities = description.get("model_ability") or description.get("abilities") or []
    return [str(a) for a in abilities]


def _object(reply: Any, subject: str) -> dict[str, Any]:
    """``reply`` when it is an object, else a ProtocolError."""
    if isinstance(reply, dict):
        return reply
    raise malformed(subject, f"the reply must be an object, got {type(reply).__name__}")


def _listed(reply: Any, key: str, subject: str) -> list[Any]:
    """The list a registry reply holds under ``key`` (or the reply itself, when a list)."""
    items = reply.get(key, []) if isinstance(reply, dict) else reply
    if isinstance(items, list):
        return items
    raise malformed(subject, f"{key!r} must be a list, got {type(items).__name__}")


def _uid_of(reply: Any, subject: str) -> str:
    uid = _object(reply, subject).get("model_uid")
    if isinstance(uid, str) and uid:
        return uid
    raise malformed(subject, f"the reply has no model_uid (got {uid!r})")


class AsyncClient:
    """The asyncio natserve client. Connects on first use; use ``async with`` or ``await close()``."""

    def __init__(
        self,
        url: str | list[str] = DEFAULT_URL,
        *,
        prefix: str = DEFAULT_PREFIX,
        timeout: float = 600.0,
        request_timeout: float = 30.0,
        encoding: str = "msgpack",
        name: str | None = None,
        transport: ClientTransport | None = None,
        stream_keepalive: int | None = DEFAULT_KEEPALIVE,
        **nats_options: Any,
    ) -> None:
        if encoding not in _ENCODINGS:
            raise ValueError(f"encoding must be 'msgpack' or 'json', got {encoding!r}")
        if timeout <= 0 or request_timeout <= 0:
            raise ValueError(f"timeout ({timeout}) and request_timeout ({request_timeout}) must be positive")
        self.url = url
        self.subjects = Subjects(prefix)
        self.timeout = float(timeout)
        self.request_timeout = float(request_timeout)
        self.encoding = _ENCODINGS[encoding]
        self.name = name or "natserve-client"
        if stream_keepalive is not None and not 1 <= stream_keepalive <= MAX_KEEPALIVE:
            raise ValueError(
                f"stream_keepalive must be 1 to {MAX_KEEPALIVE} chunks or None, got {stream_keepalive}"
            )
        # Streams ask their replica for the keepalive: acknowledged every this many chunks, a
        # stream whose reader goes silent stops (``_keepalive``). None: run to the end.
        self.stream_keepalive = stream_keepalive
        self._nats_options = nats_options
        self._nc: NATSConnection | None = None
        # The transport given, started on first use; else made on first use from a connection.
        self._given = transport
        self._transport: ClientTransport | None = None
        self._lock: asyncio.Lock | None = None
        self._closed = False

    @property
    def prefix(self) -> str:
        return self.subjects.prefix

    def __repr__(self) -> str:
        return f"<AsyncClient url={self.url!r} prefix={self.prefix!r}>"

    # ------------------------------------------------------------------ connection

    async def connect(self) -> None:
        """Connect now (calls connect lazily otherwise); TransportError if no server answers."""
        await self._get_transport()

    async def _get_transport(self) -> ClientTransport:
        if self._transport is not None:
            return self._transport
        if self._closed:
            raise TransportError("this client is closed")
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._transport is None:
                transport: ClientTransport
                if self._given is not None:
                    transport = self._given
                else:
                    self._nc = await self._connect()
                    transport = NatsTransport(self._nc, encoding=self.encoding)
                await transport.start()
                # Worker deaths, announced by the registry, end the requests that worker had
                # accepted at once instead of at their timeout.
                await transport.subscribe(self.subjects.workers_events, self._on_worker_event)
                self._transport = transport
        return self._transport

    async def _on_worker_event(self, subject: str, event: Any) -> None:
        if not isinstance(event, dict) or event.get("state") not in ("dead", "stopped"):
            return
        worker_id, transport = str(event.get("worker_id")), self._transport
        if transport is None:
            return
        if event["state"] == "dead":
            why = f"died (no heartbeat for {event.get('dead_after', '?')} s)"
        else:
            why = "stopped"
        failed = transport.fail_worker(
            worker_id,
            lambda: Unavailable(f"worker {worker_id!r} {why} while handling this request"),
        )
        if failed:
            logger.warning("worker %s %s: %d request(s) in flight on it failed", worker_id, why, failed)

    async def _connect(self) -> NATSConnection:
        # A local pool that `natserve up` runs needs its token, kept in NATSERVE_HOME.
        options = with_local_token(self.url, self._nats_options)
        bound = float(options.get("connect_timeout", _CONNECT_TIMEOUT))
        options.setdefault("connect_timeout", bound)
        last_error: list[BaseException] = []
        user_error_cb = options.get("error_cb")

        async def error_cb(exc: Exception) -> None:
            last_error[:] = [exc]
            if user_error_cb is not None:
                await user_error_cb(exc)

        options["error_cb"] = error_cb
        servers = self.url if isinstance(self.url, str) else ", ".join(self.url)
        user_disconnected_cb = options.get("disconnected_cb")

        async def disconnected_cb() -> None:
            logger.info("disconnected from NATS %s; reconnecting", servers)
            transport = self._transport
            if transport is not None:
                # What the services sent while we were away is lost: a stream would have a gap
                # and a reply might never come, so every call in flight ends now.
                failed = transport.fail_all(
                    lambda: TransportError(
                        f"lost the connection to NATS ({servers}) while waiting for a reply"
                    )
                )
                if failed:
                    logger.warning("%d call(s) in flight failed: the NATS connection dropped", failed)
            if user_disconnected_cb is not None:
                await user_disconnected_cb()

        options["disconnected_cb"] = disconnected_cb
        # nats-py retries a first connect forever when reconnecting is on; a client should
        # rather say that nothing is there.
        try:
            return await asyncio.wait_for(connect(self.url, name=self.name, **options), bound)
        except TimeoutError:
            why = f" (last error: {last_error[0]!r})" if last_error else ""
            raise TransportError(
                f"cannot connect to NATS at {servers} within {bound:g} s{why}; is the server "
                "running? (`natserve up` starts one)"
            ) from None

    async def close(self) -> None:
        """Close the connection; pending cancels and publishes are flushed first."""
        self._closed = True
        transport, nc = self._transport, self._nc
        self._transport = self._nc = None
        if transport is not None:
            await transport.close()
        if nc is not None and not nc.is_closed:
            try:
                await nc.close()
            except Exception as exc:
                logger.debug("error closing NATS connection: %r", exc)

    async def __aenter__(self) -> AsyncClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _request(self, subject: str, payload: dict[str, Any], timeout: float | None = None) -> Any:
        transport = await self._get_transport()
        try:
            return await transport.request(
                subject, payload, timeout=self.request_timeout if timeout is None else timeout
            )
        except NoResponders as exc:
            raise NoResponders(
                f"no natserve registry answers on {subject!r}: is `natserve up` or `natserve registry` "
                f"running on this NATS server with prefix {self.prefix!r}?",
                subject=subject,
            ) from exc

    # ------------------------------------------------------------------ registrations

    async def register_model(
        self, model_type: str, model: str | dict[str, Any], persist: bool = False
    ) -> dict[str, Any]:
        """Register a custom model definition (Xinference's JSON, as a string or a dict).

        It is validated here first, so a mistake fails fast and names the field. Returns
        ``{"model_type", "model_name"}``.
        """
        parse_definition(model_type, model)
        subject = self.subjects.registry_register
        reply = await self._request(
            subject, {"model_type": model_type, "model": model, "persist": bool(persist)}
        )
        return dict(_object(reply, subject))

    async def unregister_model(self, model_type: str, model_name: str) -> None:
        await self._request(
            self.subjects.registry_unregister, {"model_type": model_type, "model_name": model_name}
        )

    async def list_model_registrations(self, model_type: str | None = None) -> list[dict[str, Any]]:
        """``[{"model_name", "model_type", "persist", ...}]``, all types when ``model_type`` is None."""
        payload = {} if model_type is None else {"model_type": model_type}
        subject = self.subjects.registry_list
        return list(_listed(await self._request(subject, payload), "registrations", subject))

    async def get_model_registration(self, model_type: str, model_name: str) -> dict[str, Any]:
        subject = self.subjects.registry_get
        reply = await self._request(subject, {"model_type": model_type, "model_name": model_name})
        return dict(_object(reply, subject))

    # ------------------------------------------------------------------ running models

    async def launch_model(
        self,
        model_name: str,
        model_type: str | None = None,
        model_uid: str | None = None,
        model_format: str | None = None,
        model_size_in_billions: float | str | None = None,
        quantization: str | None = None,
        replica: int = 1,
        n_gpu: int | str | None = "auto",
        request_limits: int | None = None,
        wait: bool = True,
        timeout: float | None = None,
        progress: bool | ProgressCallback | None = None,
        **kwargs: Any,
    ) -> str:
        """Launch a registered model; returns its uid once every replica is ready.

        ``wait=False`` returns the uid as soon as the launch is placed. ``progress``: None shows
        a progress bar when stderr is a terminal, True always, False never; a callable receives
        every :class:`ModelEvent` instead. Extra keyword arguments (``worker_id``,
        ``max_batch_size``) go into the launch request, which rejects unknown ones.
        """
        if isinstance(model_size_in_billions, str):
            # Xinference accepts "1_8" for 1.8.
            model_size_in_billions = float(model_size_in_billions.replace("_", "."))
        timeout = self.timeout if timeout is None else float(timeout)
        payload: dict[str, Any] = {
            "model_name": model_name,
            "model_type": model_type,
            "model_uid": model_uid,
            "model_format": model_format,
            "model_size_in_billions": model_size_in_billions,
            "quantization": quantization,
            "replica": replica,
            "n_gpu": n_gpu,
            "request_limits": request_limits,
            "wait": wait,
            "timeout": timeout,
            **kwargs,
        }
        payload = {k: v for k, v in payload.items() if v is not None}
        try:
            LaunchRequest.model_validate(payload)
        except ValidationError as exc:
            raise BadRequest(f"invalid launch request: {format_validation_error(exc)}") from exc

        subject = self.subjects.models_launch
        request_timeout = timeout + _LAUNCH_MARGIN if wait else self.request_timeout
        watcher = make_progress(progress) if wait else None
        if watcher is None:
            return _uid_of(await self._request(subject, payload, request_timeout), subject)

        transport = await self._get_transport()
        follower = LaunchFollower(watcher, model_name, model_uid)
        # Subscribe before asking, or the first events could be missed.
        events = await transport.subscribe(self.subjects.events("*"), follower)
        try:
            reply = await self._request(subject, payload, request_timeout)
        finally:
            # The events queued before the reply (the final "ready" among them) still reach
            # the bar: closing waits for them, within a bound.
            await events.close()
            follower.close()
        return _uid_of(reply, subject)

    async def get_model(self, model_uid: str) -> AsyncHandle:
        """A handle for a running model: chat + generate, generate only, or embedding."""
        description = await self.describe_model(model_uid)
        return self._handle_for(model_uid, description)

    def _handle_for(self, model_uid: str, description: Mapping[str, Any]) -> AsyncHandle:
        if _model_type_of(description) == "embedding":
            return AsyncEmbeddingModelHandle(self, model_uid, description)
        if "chat" in _abilities_of(description):
            return AsyncChatModelHandle(self, model_uid, description)
        return AsyncGenerateModelHandle(self, model_uid, description)

    async def list_models(self) -> dict[str, dict[str, Any]]:
        """``{model_uid: description}`` for every running model, as Xinference returns it."""
        subject = self.subjects.models_list
        reply = await self._request(subject, {})
        models = reply.get("models", reply) if isinstance(reply, dict) else reply
        try:
            if isinstance(models, list):
                return {str(m["model_uid"]): dict(m) for m in models}
            if isinstance(models, dict):
                return {str(k): dict(v) for k, v in models.items()}
        except (KeyError, TypeError, ValueError) as exc:
            raise malformed(
                subject, f"a model is not described by an object with a model_uid: {exc!r}"
            ) from exc
        raise malformed(subject, f"'models' must be a list or an object, got {type(models).__name__}")

    async def describe_model(self, model_uid: str) -> dict[str, Any]:
        """Name, type, abilities, format, quantization, replicas and their workers."""
        check_name(model_uid, "model_uid")
        subject = self.subjects.models_describe
        return dict(_object(await self._request(subject, {"model_uid": model_uid}), subject))

    async def terminate_model(self, model_uid: str) -> None:
        check_name(model_uid, "model_uid")
        await self._request(self.subjects.models_terminate, {"model_uid": model_uid})

    async def pool_report(self) -> dict[str, Any]:
        """The registry's whole ``workers.list`` reply: ``{"workers": [...], "recent_failures":
        [...]}``, the workers as :meth:`list_workers` gives them and the launches that failed
        lately (``natserve status`` and the gateway's pool page show both)."""
        subject = self.subjects.workers_list
        reply = await self._request(subject, {})
        failures = _listed(reply, "recent_failures", subject) if isinstance(reply, dict) else []
        return {"workers": list(_listed(reply, "workers", subject)), "recent_failures": list(failures)}

    async def list_workers(self) -> list[dict[str, Any]]:
        """``[{"worker_id", "host", "version", "devices", "replicas", "last_seen", "alive",
        "state", "dead_after", ...}]``; ``state`` is ``alive``, ``stopping``, ``stopped`` or
        ``dead`` (no heartbeat for ``dead_after`` seconds)."""
        subject = self.subjects.workers_list
        return list(_listed(await self._request(subject, {}), "workers", subject))
