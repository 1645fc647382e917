"""Run the gateway: its listening socket, uvicorn on the running event loop, start and stop.

``natserve gateway`` and ``natserve up`` both bind the socket first (:func:`bind_listener`), so
that a taken port is a clear error before anything else starts, and then run
:func:`run_gateway` as one of their services: it connects its ``AsyncClient``, serves the app
with uvicorn (httptools; the inference routes on :mod:`.protocol`'s lean cycle) on that socket
until ``stop`` is set, and stops in order: no new connections, requests in flight finish (at
most ``drain_timeout``), then the NATS connection closes. Signals stay natserve's: uvicorn's own
handlers are not installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator
from typing import Any

from broker_client import AsyncClient, NatsAuth, connect_options

from .app import DEFAULT_MAX_BODY_BYTES, create_app
from .auth import ApiKeys
from .metrics import GatewayMetrics
from .protocol import GatewayHttpProtocol
from .service import GatewayService

__all__ = ["DEFAULT_HTTP_PORT", "HttpListener", "bind_listener", "is_loopback", "run_gateway"]

logger = logging.getLogger(__name__)

# Xinference's default port: its clients' base URLs work unchanged.
DEFAULT_HTTP_PORT = 9997
_BACKLOG = 2048


def is_loopback(host: str) -> bool:
    return host in ("127.0.0.1", "::1", "localhost") or host.startswith("127.")


def bind_listener(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (0: a free port); OSError when it is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP spelled out: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on sockets
    # whose proto says TCP, and accepted sockets inherit the listener's. With proto 0 every
    # response, written as a head and a body, waited out the client's delayed ACK: 40 ms.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        # SO_REUSEADDR: a port left in TIME_WAIT by the last run is free; a listener is not.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(_BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


class HttpListener:
    """The gateway's bound socket and its API keys: made before anything starts, served later."""

    def __init__(self, sock: socket.socket, api_keys: ApiKeys | None = None) -> None:
        self.sock = sock
        self.api_keys = api_keys or ApiKeys()

    @property
    def host(self) -> str:
        return str(self.sock.getsockname()[0])

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def close(self) -> None:
        self.sock.close()


def _server_class() -> Any:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn without its signal handlers (natserve's own stop it), telling when it serves."""

        def __init__(self, config: uvicorn.Config) -> None:
            super().__init__(config)
            self.serving = asyncio.Event()

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if not self.should_exit:
                self.serving.set()

    return Server


async def run_gateway(
    *,
    nats_url: str,
    listener: HttpListener,
    stop: asyncio.Event,
    ready: asyncio.Event,
    prefix: str = "natserve",
    auth: NatsAuth | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    drain_timeout: float = 30.0,
    metrics_registry: Any = None,
) -> None:
    """Serve the gateway on ``listener`` until ``stop``; set ``ready`` once it takes requests."""
    import uvicorn

    api_keys, sock = listener.api_keys, listener.sock
    host, port = listener.host, listener.port
    if not api_keys.enabled and not is_loopback(host):
        logger.warning(
            "the HTTP gateway on %s:%s has no API keys: anyone who reaches it can use and manage the "
            "pool; set NATSERVE_API_KEYS or NATSERVE_API_KEYS_FILE",
            host,
            port,
        )
    options = connect_options(auth) if auth is not None else {}
    client = AsyncClient(nats_url, prefix=prefix, name="natserve-gateway", **options)
    service = GatewayService(client, nats_options=options)
    try:
        await client.connect()
        app = create_app(
            service,
            api_keys=api_keys,
            max_body_bytes=max_body_bytes,
            metrics=GatewayMetrics(metrics_registry),
        )
        config = uvicorn.Config(
            app,
            # httptools; a POST to an inference route on a lean cycle of its own (protocol.py).
            http=GatewayHttpProtocol,
            lifespan="off",
            access_log=False,
            # natserve's logging is already set up: uvicorn's loggers go through its handler.
            log_config=None,
            log_level=logging.WARNING if logging.getLogger().level > logging.DEBUG else logging.DEBUG,
            backlog=_BACKLOG,
            timeout_graceful_shutdown=max(1, int(drain_timeout)),
            # The gateway never uses the client's address: no X-Forwarded-For middleware per request.
            proxy_headers=False,
            server_header=False,
        )
        server = _server_class()(config)
        serving = asyncio.create_task(server.serve(sockets=[sock]), name="natserve-gateway-http")
        started = asyncio.ensure_future(server.serving.wait())
        stopped = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait([serving, started, stopped], return_when=asyncio.FIRST_COMPLETED)
            if serving.done():
                serving.result()  # its exception, if it failed at start
                raise RuntimeError(f"the HTTP server on {host}:{port} stopped at start")
            if server.serving.is_set() and not stop.is_set():
                logger.info("HTTP gateway on http://%s:%s", host, port)
                ready.set()
                await asyncio.wait([serving, stopped], return_when=asyncio.FIRST_COMPLETED)
                if serving.done() and not stop.is_set():
                    serving.result()
                    raise RuntimeError(f"the HTTP server on {host}:{port} stopped on its own")
        finally:
            started.cancel()
            stopped.cancel()
            server.should_exit = True
            with contextlib.suppress(Exception):
                await serving
    finally:
        await service.close()
        await client.close()
        listener.close()
