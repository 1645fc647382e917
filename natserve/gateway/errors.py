"""natserve errors as OpenAI error objects, and the HTTP status each one gets.

Every error the gateway answers has OpenAI's shape, plus the ``detail`` that Xinference's
client reads for its messages::

    {"error": {"message": ..., "type": ..., "param": ..., "code": ...}, "detail": message}

The HTTP status is natserve's wire code (400, 401, 404, 409, 429, 500, 503, 504): a
:class:`~broker_client.ServiceError` keeps its ``code``, ``RequestTimeout`` is a 504,
``NoResponders`` and ``TransportError`` are 503s. Anything else is a bug: a 500 whose message
names only its type, with the traceback in the gateway's log, never in the reply.
"""

from __future__ import annotations

import logging
from typing import Any

from broker_client import (
    BadRequest,
    NatserveError,
    NotFound,
    PayloadTooLarge,
    RequestTimeout,
    ServiceError,
)

__all__ = ["InvalidField", "Unauthorized", "error_body", "error_reply"]

logger = logging.getLogger(__name__)


class InvalidField(BadRequest):
    """A 400 about one field of a request; ``param`` names it as the caller wrote it."""

    def __init__(self, message: str, *, param: str | None, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.param = param
        self.error_code = code


class Unauthorized(ServiceError):
    """A missing or wrong API key."""

    code = 401


# OpenAI's error types and codes by status; the code can be narrowed by the exception.
_KINDS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "bad_request"),
    401: ("invalid_request_error", "invalid_api_key"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    409: ("invalid_request_error", "conflict"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    500: ("server_error", "internal_error"),
    503: ("server_error", "unavailable"),
    504: ("server_error", "timeout"),
}


def error_body(
    status: int, message: str, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """The OpenAI error object of ``status`` (with Xinference's ``detail``)."""
    kind, default_code = _KINDS.get(
        status, ("server_error" if status >= 500 else "invalid_request_error", "error")
    )
    return {
        "error": {"message": message, "type": kind, "param": param, "code": code or default_code},
        "detail": message,
    }


def error_reply(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """The HTTP status and body for ``exc``, raised while answering a request."""
    if isinstance(exc, NatserveError):
        status = exc.code if 400 <= exc.code < 600 else 500
        if isinstance(exc, RequestTimeout):
            status = 504
        param = getattr(exc, "param", None)
        code = getattr(exc, "error_code", None)
        if code is None:
            if isinstance(exc, PayloadTooLarge):
                code = "payload_too_large"
            elif isinstance(exc, NotFound) and "is not running" in exc.message:
                code = "model_not_found"
        return status, error_body(status, " ".join(exc.message.split()), param=param, code=code)
    logger.error("the gateway failed on a request: %r", exc, exc_info=exc)
    return 500, error_body(500, f"internal error in the gateway ({type(exc).__name__}); see its log")
