"""What the ``natserve`` processes set up for operators: log handlers and the metrics endpoint.

Only the program that owns the process calls this (``natserve.cli.main()`` and ``natserve up``);
the libraries log through ``logging.getLogger(__name__)`` and keep their metrics on registries
they are given, and install nothing themselves.

* :func:`configure_logging`: the one stderr handler, plain text (the default) or JSON lines
  (``--log-format json`` / ``NATSERVE_LOG_FORMAT=json``), both with the request context of
  :mod:`broker_client.logcontext` (``model_uid``, ``request_id``, ``worker_id``) on each record.
* :func:`new_metrics_registry` and :class:`MetricsServer`: one prometheus_client
  ``CollectorRegistry`` per process (process metrics such as the RSS included) and the HTTP
  server that serves it on ``/metrics`` (``--metrics-port`` / ``NATSERVE_METRICS_PORT``).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from typing import IO, Any

from broker_client.logcontext import FIELDS, ContextFilter

__all__ = ["JsonFormatter", "MetricsServer", "configure_logging", "new_metrics_registry"]

LOG_FORMATS = ("text", "json")
_TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``level``, ``logger``, ``message``, the request context
    fields that are known (``model_uid``, ``request_id``, ``worker_id``) and ``exc_info``."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class _TextFormatter(logging.Formatter):
    """The plain format, with ``[model_uid request_id]`` when a record has them."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        context = " ".join(
            f"{name}={value}"
            for name in ("model_uid", "request_id")
            if (value := getattr(record, name, None)) is not None
        )
        return f"{text} [{context}]" if context else text


def configure_logging(
    level: str = "INFO", fmt: str = "text", stream: IO[str] | None = None
) -> logging.Handler:
    """Install natserve's log handler on the root logger (replacing one installed before by
    this function, leaving anybody else's alone) and set the root level."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format {fmt!r} is not one of {', '.join(LOG_FORMATS)}")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else _TextFormatter(_TEXT_FORMAT))
    handler._natserve = True  # type: ignore[attr-defined]
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_natserve", False):
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    return handler


def new_metrics_registry() -> Any:
    """A ``CollectorRegistry`` with this process's own metrics (RSS, CPU, open files, Python GC)."""
    from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector

    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


class MetricsServer:
    """``/metrics`` for one ``CollectorRegistry`` over HTTP, on a daemon thread."""

    def __init__(self, registry: Any, port: int, host: str = "127.0.0.1") -> None:
        self.registry = registry
        self.host = host
        self.port = port
        self._server: Any = None
        self._thread: Any = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def start(self) -> MetricsServer:
        from prometheus_client import start_http_server

        try:
            self._server, self._thread = start_http_server(self.port, addr=self.host, registry=self.registry)
        except OSError as exc:
            raise OSError(
                f"cannot serve metrics on {self.host}:{self.port}: {exc.strerror or exc}; "
                "pick another --metrics-port (NATSERVE_METRICS_PORT)"
            ) from exc
        # Port 0 asks the system for a free port: report the one it gave.
        self.port = int(self._server.server_address[1])
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def __enter__(self) -> MetricsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
