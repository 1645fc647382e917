"""The natserve exception tree and its mapping to wire error codes.

    NatserveError                    root of everything natserve raises
    ├── TransportError               the NATS connection itself failed (no server, closed)
    ├── ProtocolError                a reply broke the wire rules: bytes that do not decode,
    │                                a body of the wrong shape, a field the client needs missing
    ├── RequestTimeout        504    no reply within the call's timeout
    ├── NoResponders          503    nobody subscribes to the subject (unknown uid, service down)
    └── ServiceError                 a reply carried an error; ``code`` holds the wire code
        ├── BadRequest        400    the request is malformed or violates a rule
        │   └── PayloadTooLarge 400  the payload is above a NATS or natserve size limit
        ├── NotFound          404    no such model, registration, worker or uid
        ├── Conflict          409    the name or uid is taken
        ├── Overloaded        429    the replica is at its request limit; retry later
        ├── InternalError     500    a bug or an unexpected failure on the server side
        ├── Unavailable       503    no worker can take it now (no room, worker gone)
        └── ServerTimeout     504    the server gave up waiting for something

Servers raise the same classes; the service layer turns them into the
``Nats-Service-Error-Code`` / ``Nats-Service-Error`` headers and the
``{"error": {"type", "code", "message"}}`` body, and the client turns them back.
``ProtocolError`` is the client's own verdict on a reply, never sent: it is no ``ServiceError``
(the service sent no error) and no ``BadRequest`` (the request was fine); a service that gets one
from a service it called answers a 500.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "BadRequest",
    "Conflict",
    "InternalError",
    "NatserveError",
    "NoResponders",
    "NotFound",
    "Overloaded",
    "PayloadTooLarge",
    "ProtocolError",
    "RequestTimeout",
    "ServerTimeout",
    "ServiceError",
    "TransportError",
    "Unavailable",
    "error_from_wire",
]


class NatserveError(Exception):
    """Root of every natserve error."""

    code: int = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class TransportError(NatserveError):
    """The NATS connection failed: no server reachable, connection closed, draining."""

    code = 503


class ProtocolError(NatserveError):
    """A reply that breaks the wire rules: it does not decode, has the wrong shape, or lacks a
    field the client needs. A bug or a version mismatch on the other side, not a bad request."""

    code = 500

    def __init__(self, message: str, *, subject: str = "") -> None:
        super().__init__(message)
        self.subject = subject


class RequestTimeout(NatserveError):
    """No reply arrived within the timeout the call gave."""

    code = 504

    def __init__(self, message: str, *, subject: str = "", timeout: float | None = None) -> None:
        super().__init__(message)
        self.subject = subject
        self.timeout = timeout


class NoResponders(NatserveError):
    """Nothing listens on the subject: an unknown model uid or a service that is not running."""

    code = 503

    def __init__(self, message: str, *, subject: str = "") -> None:
        super().__init__(message)
        self.subject = subject


class ServiceError(NatserveError):
    """A service answered with an error; ``code`` is the wire code."""

    code = 500

    def __init__(self, message: str, *, code: int | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    def to_wire(self) -> dict[str, Any]:
        return {"error": {"type": type(self).__name__, "code": self.code, "message": self.message}}


class BadRequest(ServiceError):
    code = 400


class PayloadTooLarge(BadRequest):
    code = 400


class NotFound(ServiceError):
    code = 404


class Conflict(ServiceError):
    code = 409


class Overloaded(ServiceError):
    code = 429


class InternalError(ServiceError):
    code = 500


class Unavailable(ServiceError):
    code = 503


class ServerTimeout(ServiceError):
    code = 504


_BY_NAME: dict[str, type[ServiceError]] = {
    cls.__name__: cls
    for cls in (
        BadRequest,
        PayloadTooLarge,
        NotFound,
        Conflict,
        Overloaded,
        InternalError,
        Unavailable,
        ServerTimeout,
    )
}
_BY_CODE: dict[int, type[ServiceError]] = {
    400: BadRequest,
    404: NotFound,
    409: Conflict,
    429: Overloaded,
    500: InternalError,
    503: Unavailable,
    504: ServerTimeout,
}


def error_from_wire(code: int, message: str, type_name: str | None = None) -> ServiceError:
    """Rebuild the exception a service sent; the type name wins over the code when known."""
    cls = _BY_NAME.get(type_name or "") or _BY_CODE.get(code) or ServiceError
    return cls(message, code=code)
