"""The sync facade: ``Client`` and its handles, run on a private event-loop thread.

``Client`` has the methods of ``AsyncClient`` and runs one on a loop thread of its own, so it
works in scripts and notebooks alike, and refuses (with a clear ``RuntimeError``) to be called
from inside a running event loop, where it would block that loop.

    client = Client("nats://127.0.0.1:4222")
    client.register_model(model_type="LLM", model=json.dumps(custom_model))
    uid = client.launch_model(model_name="nsql-2B")
    client.get_model(uid).generate("SELECT")

Its handles (``GenerateModelHandle``, ``ChatModelHandle``, ``EmbeddingModelHandle``) and
``Stream`` wrap the async ones on the same loop; each keeps its ``Client`` alive.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import weakref
from collections.abc import Coroutine, Mapping, Sequence
from typing import Any, TypeVar

from ._async_client import DEFAULT_URL, AsyncClient
from ._client_transport import ClientTransport
from ._errors import TransportError
from ._handles import (
    AsyncChatModelHandle,
    AsyncEmbeddingModelHandle,
    AsyncGenerateModelHandle,
    AsyncModelHandle,
    AsyncStream,
)
from ._keepalive import DEFAULT_EVERY as DEFAULT_KEEPALIVE
from ._progress import ProgressCallback
from ._subjects import DEFAULT_PREFIX, Subjects

__all__ = [
    "ChatModelHandle",
    "Client",
    "EmbeddingModelHandle",
    "GenerateModelHandle",
    "ModelHandle",
    "Stream",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")


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
        transport: ClientTransport | None = None,
        stream_keepalive: int | None = DEFAULT_KEEPALIVE,
        **nats_options: Any,
    ) -> None:
        self._async = AsyncClient(
            url,
            prefix=prefix,
            timeout=timeout,
            request_timeout=request_timeout,
            encoding=encoding,
            name=name,
            transport=transport,
            stream_keepalive=stream_keepalive,
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

    def pool_report(self) -> dict[str, Any]:
        return self._run(self._async.pool_report())


# ---------------------------------------------------------------------------- sync handles


class Stream:
    """The chunks of one streamed reply, as an iterator (sync ``Client``).

    Closing it — ``close()``, ``with``, breaking out of a ``for`` over it, or dropping it —
    closes the async stream underneath, which tells the replica to cancel.
    """

    def __init__(self, loop_thread: _LoopThread, stream: AsyncStream, owner: object = None) -> None:
        self._loop_thread = loop_thread
        # The sync Client: it closes its connection when collected, so it must outlive us.
        self._owner = owner
        self._stream: AsyncStream | None = stream
        self.request_id = stream.request_id
        self._accepted = stream._accepted

    @property
    def worker_id(self) -> str | None:
        """The worker generating this stream, when known."""
        return self._accepted[-1] if self._accepted else None

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> dict[str, Any]:
        stream = self._stream
        if stream is None:
            raise StopIteration
        try:
            return self._loop_thread.run(_anext(stream))
        except StopAsyncIteration:
            self._stream = None
            raise StopIteration from None
        except BaseException:
            # The async stream has already sent the cancel if one was due.
            self._stream = None
            raise

    def close(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            self._loop_thread.run(stream.aclose())

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        stream, self._stream = getattr(self, "_stream", None), None
        if stream is not None:
            # Never block in a finalizer: it may run on any thread, the loop's included.
            self._loop_thread.submit(stream.aclose())


async def _anext(stream: AsyncStream) -> dict[str, Any]:
    return await stream.__anext__()


class ModelHandle:
    """Base of the sync handles; ``owner`` (the sync Client) is kept alive as long as the handle."""

    def __init__(self, loop_thread: _LoopThread, handle: AsyncModelHandle, owner: object = None) -> None:
        self._loop_thread = loop_thread
        self._handle = handle
        self._owner = owner

    @property
    def model_uid(self) -> str:
        return self._handle.model_uid

    @property
    def description(self) -> dict[str, Any]:
        return self._handle.description

    def __repr__(self) -> str:
        return f"<{type(self).__name__} model_uid={self.model_uid!r}>"

    def _result(self, value: Any) -> Any:
        if isinstance(value, AsyncStream):
            return Stream(self._loop_thread, value, self._owner)
        return value


class GenerateModelHandle(ModelHandle):
    _handle: AsyncGenerateModelHandle

    def generate(
        self,
        prompt: str,
        generate_config: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> dict[str, Any] | Stream:
        """A completion dict, or with ``{"stream": True}`` an iterator of chunk dicts."""
        return self._result(  # type: ignore[no-any-return]
            self._loop_thread.run(
                self._handle.generate(prompt, generate_config, timeout=timeout, request_id=request_id)
            )
        )


class ChatModelHandle(GenerateModelHandle):
    _handle: AsyncChatModelHandle

    def chat(
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
    ) -> dict[str, Any] | Stream:
        """A ``chat.completion`` dict, or with ``{"stream": True}`` an iterator of chunk dicts.
        ``tools`` (OpenAI's list) is ``generate_config["tools"]``, as Xinference's client takes it."""
        return self._result(  # type: ignore[no-any-return]
            self._loop_thread.run(
                self._handle.chat(
                    messages,
                    generate_config,
                    prompt=prompt,
                    system_prompt=system_prompt,
                    chat_history=chat_history,
                    tools=tools,
                    timeout=timeout,
                    request_id=request_id,
                )
            )
        )


class EmbeddingModelHandle(ModelHandle):
    _handle: AsyncEmbeddingModelHandle

    def create_embedding(
        self,
        input: str | Sequence[str],
        *,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> dict[str, Any]:
        return self._loop_thread.run(
            self._handle.create_embedding(input, timeout=timeout, request_id=request_id)
        )
