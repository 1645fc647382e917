"""Who a log record is about: the model uid, request id and worker id of the current request.

Services set these context variables around each request (``ServiceHost`` from the endpoint's
metadata and the ``Natserve-Request-Id`` header, a replica once it knows the request's id); each
request runs in its own task, so the values never leak into another request.

Nothing here installs a handler: :class:`ContextFilter` copies the values onto log records, and
the program that owns the process (``natserve``'s ``main()``) decides to add it to its handlers,
for instance next to a JSON formatter.
"""

from __future__ import annotations

import logging
from contextvars import ContextVar
from typing import Any

__all__ = ["FIELDS", "ContextFilter", "bind", "current", "get", "set_request_id"]

FIELDS = ("model_uid", "request_id", "worker_id")

_VARS: dict[str, ContextVar[str | None]] = {
    name: ContextVar(f"natserve_{name}", default=None) for name in FIELDS
}
_REQUEST_ID = _VARS["request_id"]


def bind(**values: str | None) -> None:
    """Set the fields given (``None`` values are ignored) for the rest of the current task."""
    for name, value in values.items():
        if value is not None:
            _VARS[name].set(value)


def set_request_id(value: str) -> None:
    """``bind(request_id=value)``, once per request on a worker's hot path."""
    _REQUEST_ID.set(value)


def get(name: str) -> str | None:
    """One field's value in this context."""
    return _VARS[name].get()


def current() -> dict[str, str]:
    """The fields set in this context, without the unset ones."""
    values: dict[str, str] = {}
    for name, var in _VARS.items():
        value = var.get()
        if value is not None:
            values[name] = value
    return values


class ContextFilter(logging.Filter):
    """Adds ``model_uid``, ``request_id`` and ``worker_id`` to every record (None when unknown);
    a value passed explicitly with ``extra=`` wins."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, var in _VARS.items():
            if getattr(record, name, None) is None:
                value: Any = var.get()
                setattr(record, name, value)
        return True
