"""``AsyncClient`` and the sync ``Client``: the Python face of natserve.

The methods mirror Xinference's client (``register_model``, ``launch_model``, ``get_model``,
``list_models``, ...) so code written for its custom-model workflow ports by changing the import.

    client = Client("nats://127.0.0.1:4222")
    client.register_model(model_type="LLM", model=json.dumps(custom_model))
    uid = client.launch_model(model_name="nsql-2B")
    client.get_model(uid).generate("SELECT")

``AsyncClient`` is the core; ``Client`` runs one on a private event-loop thread, so it works in
scripts and notebooks alike, and refuses (with a clear ``RuntimeError``) to be called from inside
a running event loop, where it would block that loop.

Timeouts: ``timeout`` (default 600 s) bounds generation and launch calls, ``request_timeout``
(default 30 s) the registry's bookkeeping calls; every call takes its own ``timeout=`` too. The
first connection gives up after ``connect_timeout`` (a nats-py option, default 5 s here); later
disconnects are retried by nats-py while calls wait within their own timeouts. Nothing relies on
nats-py's 0.5 s request default.

Other keyword arguments go to nats-py's ``connect()``: credentials and TLS, e.g.
``Client(url, **connect_options(NatsAuth(user="client", password=...)))`` with
``broker_client._auth``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import sys
import threading
import weakref
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, TypeVar

from pydantic import ValidationError

from . import codec
from ._definition import format_validation_error, parse_definition
from ._errors import BadRequest, NatserveError, NoResponders, TransportError, Unavailable
from ._handles import (
    AsyncChatModelHandle,
    AsyncEmbeddingModelHandle,
    AsyncGenerateModelHandle,
    ChatModelHandle,
    EmbeddingModelHandle,
    GenerateModelHandle,
)
from ._messages import LaunchRequest, ModelEvent
from ._subjects import DEFAULT_PREFIX, Subjects, check_name
from ._transport import NATSConnection, Transport, connect

__all__ = ["AsyncClient", "Client", "ProgressCallback"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_URL = "nats://127.0.0.1:4222"
ProgressCallback = Callable[[ModelEvent], None]
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


def _model_type_of(description: Mapping[str, Any]) -> str:
    return str(description.get("model_type") or description.get("type") or "LLM")


def _abilities_of(description: Mapping[str, Any]) -> list[str]:
    abilities = description.get("model_ability") or description.get("abilities") or []
    return [str(a) for a in abilities]


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
        **nats_options: Any,
    ) -> None:
        if encoding not in _ENCODINGS:
            raise ValueError(f"encoding must be 'msgpack' or 'json', got {encoding!r}")
        if timeout <= 0 or request_timeout <= 0:
            raise ValueError("timeout and request_timeout must be positive")
        self.url = url
        self.subjects = Subjects(prefix)
        self.timeout = float(timeout)
        self.request_timeout = float(request_timeout)
        self.encoding = _ENCODINGS[encoding]
        self.name = name or "natserve-client"
        self._nats_options = nats_options
        self._nc: NATSConnection | None = None
        self._transport: Transport | None = None
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

    async def _get_transport(self) -> Transport:
        if self._transport is not None:
            return self._transport
        if self._closed:
            raise TransportError("this client is closed")
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._transport is None:
                nc = await self._connect()
                transport = Transport(nc, encoding=self.encoding)
                await transport.start()
                # Worker deaths, announced by the registry, end the requests that worker had
                # accepted at once instead of at their timeout.
                await nc.subscribe(self.subjects.workers_events, cb=self._on_worker_event)
                self._nc, self._transport = nc, transport
        return self._transport

    async def _on_worker_event(self, msg: Any) -> None:
        try:
            event = codec.decode(msg.data, codec.detect(msg.data, msg.headers))
        except NatserveError:
            return
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
        options = dict(self._nats_options)
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
        reply = await self._request(
            self.subjects.registry_register,
            {"model_type": model_type, "model": model, "persist": bool(persist)},
        )
        return dict(reply)

    async def unregister_model(self, model_type: str, model_name: str) -> None:
        await self._request(
            self.subjects.registry_unregister, {"model_type": model_type, "model_name": model_name}
        )

    async def list_model_registrations(self, model_type: str | None = None) -> list[dict[str, Any]]:
        """``[{"model_name", "model_type", "persist", ...}]``, all types when ``model_type`` is None."""
        payload = {} if model_type is None else {"model_type": model_type}
        reply = await self._request(self.subjects.registry_list, payload)
        if isinstance(reply, dict):
            return list(reply.get("registrations", []))
        return list(reply)

    async def get_model_registration(self, model_type: str, model_name: str) -> dict[str, Any]:
        reply = await self._request(
            self.subjects.registry_get, {"model_type": model_type, "model_name": model_name}
        )
        return dict(reply)

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

        request_timeout = timeout + _LAUNCH_MARGIN if wait else self.request_timeout
        watcher = _make_progress(progress) if wait else None
        if watcher is None:
            reply = await self._request(self.subjects.models_launch, payload, request_timeout)
            return str(reply["model_uid"])

        transport = await self._get_transport()
        # Without a uid given, the registry picks one: follow the name until an event names it.
        followed = {model_uid} if model_uid is not None else set()

        async def on_event(msg: Any) -> None:
            try:
                data = codec.decode(msg.data, codec.detect(msg.data, msg.headers))
                event = ModelEvent.model_validate(data)
            except (NatserveError, ValidationError) as exc:
                logger.debug("ignoring malformed model event on %s: %r", msg.subject, exc)
                return
            if event.model_uid not in followed:
                if model_uid is not None or event.model_name != model_name:
                    return
                followed.add(event.model_uid)
            try:
                watcher(event)
            except Exception:
                logger.exception("progress callback failed")

        # Subscribe before asking, or the first events could be missed.
        sub = await transport.nc.subscribe(self.subjects.events("*"), cb=on_event)
        try:
            reply = await self._request(self.subjects.models_launch, payload, request_timeout)
        finally:
            # Drain rather than unsubscribe, so the events queued before the reply (the final
            # "ready" among them) still reach the bar; bounded, as it waits on the server.
            try:
                await asyncio.wait_for(sub.drain(), 2.0)
            except Exception as exc:
                logger.debug("draining the model events subscription failed: %r", exc)
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
            close = getattr(watcher, "close", None)
            if close is not None:
                close()
        return str(reply["model_uid"])

    async def get_model(
        self, model_uid: str
    ) -> AsyncChatModelHandle | AsyncGenerateModelHandle | AsyncEmbeddingModelHandle:
        """A handle for a running model: chat + generate, generate only, or embedding."""
        description = await self.describe_model(model_uid)
        return self._handle_for(model_uid, description)

    def _handle_for(
        self, model_uid: str, description: Mapping[str, Any]
    ) -> AsyncChatModelHandle | AsyncGenerateModelHandle | AsyncEmbeddingModelHandle:
        if _model_type_of(description) == "embedding":
            return AsyncEmbeddingModelHandle(self, model_uid, description)
        if "chat" in _abilities_of(description):
            return AsyncChatModelHandle(self, model_uid, description)
        return AsyncGenerateModelHandle(self, model_uid, description)

    async def list_models(self) -> dict[str, dict[str, Any]]:
        """``{model_uid: description}`` for every running model, as Xinference returns it."""
        reply = await self._request(self.subjects.models_list, {})
        models = reply.get("models", reply) if isinstance(reply, dict) else reply
        if isinstance(models, list):
            return {str(m["model_uid"]): dict(m) for m in models}
        return {str(k): dict(v) for k, v in models.items()}

    async def describe_model(self, model_uid: str) -> dict[str, Any]:
        """Name, type, abilities, format, quantization, replicas and their workers."""
        check_name(model_uid, "model_uid")
        return dict(await self._request(self.subjects.models_describe, {"model_uid": model_uid}))

    async def terminate_model(self, model_uid: str) -> None:
        check_name(model_uid, "model_uid")
        await self._request(self.subjects.models_terminate, {"model_uid": model_uid})

    async def list_workers(self) -> list[dict[str, Any]]:
        """``[{"worker_id", "host", "version", "devices", "replicas", "last_seen", "alive",
        "state", "dead_after", ...}]``; ``state`` is ``alive``, ``stopping``, ``stopped`` or
        ``dead`` (no heartbeat for ``dead_after`` seconds)."""
        reply = await self._request(self.subjects.workers_list, {})
        if isinstance(reply, dict):
            return list(reply.get("workers", []))
        return list(reply)


# ---------------------------------------------------------------------------- launch progress


def _make_progress(progress: bool | ProgressCallback | None) -> ProgressCallback | None:
    if callable(progress):
        return progress
    if progress is None:
        isatty = getattr(sys.stderr, "isatty", None)
        progress = bool(isatty and isatty())
    return _RichProgress() if progress else None


class _RichProgress:
    """A rich progress bar on stderr, one line per replica, fed by ModelEvents."""

    def __init__(self) -> None:
        self._progress: Any = None
        self._tasks: dict[int, Any] = {}

    def __call__(self, event: ModelEvent) -> None:
        if self._progress is None:
            # rich is imported only when a bar is shown.
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                Progress,
                SpinnerColumn,
                TaskProgressColumn,
                TextColumn,
                TimeElapsedColumn,
            )

            self._progress = Progress(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                BarColumn(),
                TaskProgressColumn(),
                TimeElapsedColumn(),
                console=Console(stderr=True),
            )
            self._progress.start()
        replica = event.replica_index or 0
        label = f"{event.model_uid}" + (f" #{replica}" if event.replica_index is not None else "")
        description = f"{label} {event.stage}" + (f": {event.message}" if event.message else "")
        task = self._tasks.get(replica)
        if task is None:
            task = self._tasks[replica] = self._progress.add_task(description, total=None)
        if event.stage == "ready":
            self._progress.update(task, description=description, total=1.0, completed=1.0)
        elif event.fraction is not None:
            self._progress.update(task, description=description, total=1.0, completed=event.fraction)
        else:
            self._progress.update(task, description=description)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


# ---------------------------------------------------------------------------- sync facade


class _LoopThread:
    """A private event loop on a daemon thread that runs the async client for the sync one."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._main, name=name, daemon=True)
        self.thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def _check_caller(self) -> None:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return
        raise RuntimeError(
            "the sync natserve Client was called from inside a running event loop, where it "
            "would block that loop; use broker_client.AsyncClient and await its methods instead"
        )

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop and wait; Ctrl-C cancels it there too."""
        try:
            self._check_caller()
            if self.loop.is_closed():
                raise TransportError("this client is closed")
        except BaseException:
            coro.close()
            raise
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result()
        except BaseException:
            # KeyboardInterrupt and friends: stop the work on the loop (streams send their cancel).
            if not future.done():
                future.cancel()
                try:
                    future.result(timeout=5)
                except BaseException as exc:
                    logger.debug("cancelled call ended with %r", exc)
            raise
        finally:
            # The future holds the exception whose traceback holds this frame: break the cycle
            # so a dropped client is freed (and its thread stopped) without waiting for the GC.
            del future

    def submit(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Schedule without waiting (finalizers)."""
        if self.loop.is_closed():
            coro.close()
            return
        try:
            asyncio.run_coroutine_threadsafe(coro, self.loop)
        except RuntimeError:
            coro.close()

    def stop(self, client: AsyncClient, timeout: float = 5.0) -> None:
        if self.loop.is_closed():
            return
        if threading.current_thread() is self.thread:
            # A finalizer running on the loop itself cannot wait for it.
            self.loop.create_task(client.close())
            return
        if self.thread.is_alive():
            future = asyncio.run_coroutine_threadsafe(client.close(), self.loop)
            try:
                future.result(timeout)
            except (concurrent.futures.TimeoutError, Exception) as exc:
                logger.debug("closing the client failed: %r", exc)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout)
        if not self.thread.is_alive():
            self.loop.close()


def _shutdown(loop_thread: _LoopThread, client: AsyncClient) -> None:
    loop_thread.stop(client)


class Client:
    """The sync natserve client; same arguments and methods as :class:`AsyncClient`.

    Use it as a context manager or call ``close()``; a forgotten client is closed at exit.
    """

    def __init__(
        self,
        url: str | list[str] = DEFAULT_URL,
        *,
        prefix: str = DEFAULT_PREFIX,
        timeout: float = 600.0,
        request_timeout: float = 30.0,
        encoding: str = "msgpack",
        name: str | None = None,
        **nats_options: Any,
    ) -> None:
        self._async = AsyncClient(
            url,
            prefix=prefix,
            timeout=timeout,
            request_timeout=request_timeout,
            encoding=encoding,
            name=name,
            **nats_options,
        )
        self._loop_thread = _LoopThread(name=f"natserve-client-{id(self):x}")
        self._finalizer = weakref.finalize(self, _shutdown, self._loop_thread, self._async)

    @property
    def url(self) -> str | list[str]:
        return self._async.url

    @property
    def prefix(self) -> str:
        return self._async.prefix

    @property
    def subjects(self) -> Subjects:
        return self._async.subjects

    @property
    def timeout(self) -> float:
        return self._async.timeout

    @property
    def request_timeout(self) -> float:
        return self._async.request_timeout

    def __repr__(self) -> str:
        return f"<Client url={self.url!r} prefix={self.prefix!r}>"

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._loop_thread.run(coro)

    def connect(self) -> None:
        self._run(self._async.connect())

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def register_model(
        self, model_type: str, model: str | dict[str, Any], persist: bool = False
    ) -> dict[str, Any]:
        return self._run(self._async.register_model(model_type, model, persist))

    def unregister_model(self, model_type: str, model_name: str) -> None:
        self._run(self._async.unregister_model(model_type, model_name))

    def list_model_registrations(self, model_type: str | None = None) -> list[dict[str, Any]]:
        return self._run(self._async.list_model_registrations(model_type))

    def get_model_registration(self, model_type: str, model_name: str) -> dict[str, Any]:
        return self._run(self._async.get_model_registration(model_type, model_name))

    def launch_model(
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
        return self._run(
            self._async.launch_model(
                model_name,
                model_type=model_type,
                model_uid=model_uid,
                model_format=model_format,
                model_size_in_billions=model_size_in_billions,
                quantization=quantization,
                replica=replica,
                n_gpu=n_gpu,
                request_limits=request_limits,
                wait=wait,
                timeout=timeout,
                progress=progress,
                **kwargs,
            )
        )

    def get_model(self, model_uid: str) -> ChatModelHandle | GenerateModelHandle | EmbeddingModelHandle:
        """A handle for a running model; narrow it with ``isinstance`` when type-checking."""
        handle = self._run(self._async.get_model(model_uid))
        if isinstance(handle, AsyncEmbeddingModelHandle):
            return EmbeddingModelHandle(self._loop_thread, handle, owner=self)
        if isinstance(handle, AsyncChatModelHandle):
            return ChatModelHandle(self._loop_thread, handle, owner=self)
        return GenerateModelHandle(self._loop_thread, handle, owner=self)

    def list_models(self) -> dict[str, dict[str, Any]]:
        return self._run(self._async.list_models())

    def describe_model(self, model_uid: str) -> dict[str, Any]:
        return self._run(self._async.describe_model(model_uid))

    def terminate_model(self, model_uid: str) -> None:
        self._run(self._async.terminate_model(model_uid))

    def list_workers(self) -> list[dict[str, Any]]:
        return self._run(self._async.list_workers())
