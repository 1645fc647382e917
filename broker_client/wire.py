"""The wire rules that sit above the codec: header names, errors, reply parts, stream order.

Pure, like ``broker_client.codec``: no I/O and no ``nats`` import, so that both ends (the
client's transports, the service's ``Responder``) and anything else that speaks natserve's
protocol apply one set of rules, and the rules are tested without a server.

Wire headers:
    Content-Type            application/json | application/msgpack, on stream chunks, parts and
                            errors; on a request only when its first byte would be misread by
                            the rule for bodies without one (a transport's msgpack and JSON
                            objects never are, so its requests carry no headers at all); a
                            single successful reply has none either (it is in the request's
                            encoding)
    Natserve-Seq            1, 2, ... on stream chunks; the end is an empty message
    Natserve-Parts          N on every part of a reply split into N parts
    Natserve-Part           the part's index, 0 .. N-1
    Natserve-Request-Id     optional on a request, to follow it through logs (the natserve
                            client puts ``request_id`` in the body instead)
    Natserve-Ack            1 on a request, or ``"ack": true`` in a model request's body (the
                            client's way): tell me which worker takes it (opt-in, so that
                            `nats req` still sees the answer as the first message)
    Natserve-Accepted       <worker_id>, on an empty message a worker sends first when asked:
                            it admitted the request. A client transport records it (a request
                            whose worker dies is failed with ``fail_worker``) and never yields it.
    Natserve-Hops           n on a request a saturated replica passed on (workers/balancing.py)
    Natserve-Keepalive      "<N> <ack subject>" on the first chunk of a stream whose reader asked
                            for the keepalive (``"keepalive": N`` in its body): the reader acks
                            every N chunks there, or the stream stops (``_keepalive``)
    Nats-Service-Error-Code / Nats-Service-Error   on errors (with an {"error": ...} body)
    Status                  503 with an empty body: NATS itself says nobody subscribes
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Protocol

from pydantic import ValidationError

from . import codec
from ._definition import format_validation_error
from ._errors import (
    BadRequest,
    InternalError,
    NatserveError,
    NoResponders,
    ProtocolError,
    ServiceError,
    TransportError,
    error_from_wire,
)

__all__ = [
    "ACCEPTED_HEADER",
    "ACK_HEADER",
    "ERROR_CODE_HEADER",
    "ERROR_HEADER",
    "HEADER_ROOM",
    "HOPS_HEADER",
    "KEEPALIVE_HEADER",
    "PARTS_HEADER",
    "PART_HEADER",
    "REQUEST_ID_HEADER",
    "SEQ_HEADER",
    "STATUS_HEADER",
    "WireMessage",
    "as_service_error",
    "error_body",
    "error_headers",
    "error_line",
    "headers_size",
    "join_parts",
    "malformed",
    "part_index",
    "parts_total",
    "raise_for_error",
    "split_parts",
    "stream_message",
]

logger = logging.getLogger(__name__)

SEQ_HEADER = "Natserve-Seq"
PARTS_HEADER = "Natserve-Parts"
PART_HEADER = "Natserve-Part"
REQUEST_ID_HEADER = "Natserve-Request-Id"
ACK_HEADER = "Natserve-Ack"
ACCEPTED_HEADER = "Natserve-Accepted"
HOPS_HEADER = "Natserve-Hops"
KEEPALIVE_HEADER = "Natserve-Keepalive"
ERROR_HEADER = "Nats-Service-Error"
ERROR_CODE_HEADER = "Nats-Service-Error-Code"
STATUS_HEADER = "Status"
# Room left in a message for headers and protocol framing when splitting large replies.
HEADER_ROOM = 1024
# The longest Nats-Service-Error line and stats last_error: one line an operator can read.
_LINE = 1000


class WireMessage(Protocol):
    """What the rules read of a message: nats-py's ``Msg`` and the memory transport's."""

    @property
    def subject(self) -> str: ...
    @property
    def data(self) -> bytes: ...
    @property
    def headers(self) -> dict[str, str] | None: ...


# ---------------------------------------------------------------------------- errors


def raise_for_error(headers: Mapping[str, str] | None, data: bytes, subject: str) -> None:
    """Raise the error a reply carries (its headers and ``{"error": ...}`` body), or
    NoResponders for the server's own 503; return for anything else."""
    if not headers:
        return
    if headers.get(STATUS_HEADER) == "503" and not data:
        raise NoResponders(f"no service answers on {subject!r}", subject=subject)
    code = headers.get(ERROR_CODE_HEADER)
    if code is None:
        return
    message = headers.get(ERROR_HEADER, "")
    type_name = None
    try:
        body = codec.decode(data, codec.detect(data, headers))
        err = body.get("error") if isinstance(body, dict) else None
        if isinstance(err, dict):
            message = str(err.get("message") or message)
            type_name = err.get("type")
    except BadRequest:
        pass  # the headers alone say enough
    try:
        numeric = int(code)
    except ValueError:
        numeric = 500
    raise error_from_wire(numeric, message or f"error {code} from {subject!r}", type_name)


def error_line(message: str) -> str:
    """A message as one bounded line, for the ``Nats-Service-Error`` header and stats."""
    return " ".join(message.split())[:_LINE]


def error_headers(err: ServiceError, content_type: str, seq: int) -> dict[str, str]:
    """The headers of an error reply; ``seq`` is the number of chunks already streamed (the
    error then takes the next sequence number)."""
    headers = {
        codec.CONTENT_TYPE: content_type,
        ERROR_CODE_HEADER: str(err.code),
        ERROR_HEADER: error_line(err.message),
    }
    if seq:
        headers[SEQ_HEADER] = str(seq + 1)
    return headers


def headers_size(headers: Mapping[str, str]) -> int:
    """The bytes ``headers`` take on the wire (``NATS/1.0`` status line, ``Name: value`` lines,
    the blank line): the server counts them against ``max_payload`` with the body."""
    size = 12  # "NATS/1.0\r\n" and the closing "\r\n"
    for name, value in headers.items():
        size += len(name) + len(value.encode()) + 4  # ": " and "\r\n"
    return size


def error_body(err: ServiceError, content_type: str, limit: int) -> bytes:
    """The ``{"error": ...}`` body of ``err`` in at most ``limit`` bytes.

    An error must reach its caller even when its message is huge (a validation error lists
    every offending item: 20,000 bad specs made 2 MB): above ``limit`` the message is cut and
    says how much was cut, so the error still fits one message under the server's
    ``max_payload``.
    """
    data = codec.encode(err.to_wire(), content_type)
    if len(data) <= limit:
        return data
    message = err.message
    wire = err.to_wire()

    def cut_to(keep: int) -> bytes:
        wire["error"]["message"] = (
            f"{message[:keep]} ... [{len(message) - keep} more characters cut: an error reply "
            f"takes at most {limit} bytes here]"
        )
        return codec.encode(wire, content_type)

    # A first guess from the bytes a character of this message takes on average (UTF-8 and
    # JSON escapes vary), then cut as many characters as there are bytes still over: each
    # takes at least one, so this ends within a pass or two.
    base = len(cut_to(0))
    keep = max(0, int((limit - base) * len(message) / len(data)))
    data = cut_to(keep)
    while len(data) > limit and keep > 0:
        keep = max(0, keep - (len(data) - limit))
        data = cut_to(keep)
    return data


def as_service_error(exc: BaseException, subject: str) -> ServiceError:
    """The wire error for anything a handler raised: natserve errors keep their code, a
    validation error is a 400 naming the fields, the rest a 500 (logged with its traceback)."""
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, NatserveError):
        return error_from_wire(exc.code, exc.message)
    if isinstance(exc, ValidationError):
        return BadRequest(f"invalid value: {format_validation_error(exc)}")
    # The traceback stays in the server log; the wire gets one line.
    logger.error("internal error on %s", subject, exc_info=exc)
    return InternalError(f"internal error on {subject!r}: {type(exc).__name__}: {exc}")


def malformed(subject: str, exc: BaseException | str) -> ProtocolError:
    """The error for a reply on ``subject`` that breaks the wire rules."""
    why = exc if isinstance(exc, str) else (getattr(exc, "message", None) or str(exc))
    return ProtocolError(f"malformed reply on {subject!r}: {why}", subject=subject)


# ---------------------------------------------------------------------------- parts


def split_parts(data: bytes, max_payload: int, content_type: str) -> list[tuple[bytes, dict[str, str]]]:
    """A reply too large for one message, as the messages that carry it (``Natserve-Parts``,
    ``Natserve-Part``), each with room for its headers under ``max_payload``."""
    limit = max_payload - HEADER_ROOM
    if limit <= 0:
        raise ValueError(f"max_payload {max_payload} leaves no room for a part's {HEADER_ROOM} header bytes")
    total = -(-len(data) // limit)
    return [
        (
            data[i * limit : (i + 1) * limit],
            {codec.CONTENT_TYPE: content_type, PARTS_HEADER: str(total), PART_HEADER: str(i)},
        )
        for i in range(total)
    ]


def parts_total(headers: Mapping[str, str], subject: str) -> int:
    """How many parts a reply has, from its first part's headers."""
    try:
        total = int(headers[PARTS_HEADER])
    except ValueError:
        raise malformed(subject, f"{PARTS_HEADER} {headers[PARTS_HEADER]!r} is not a number") from None
    if total < 1:
        raise malformed(subject, f"{PARTS_HEADER} {total} is not a count of parts")
    return total


def part_index(headers: Mapping[str, str] | None, default: int, total: int, subject: str) -> int:
    """A part's place (``Natserve-Part``; ``default`` when it has none)."""
    raw = (headers or {}).get(PART_HEADER)
    if raw is None:
        return default
    try:
        index = int(raw)
    except ValueError:
        raise malformed(subject, f"{PART_HEADER} {raw!r} is not a number") from None
    if not 0 <= index < total:
        raise malformed(subject, f"{PART_HEADER} {index} is outside 0..{total - 1}")
    return index


def join_parts(parts: Mapping[int, bytes], total: int) -> bytes:
    """The reply's bytes from its ``total`` parts, by index (their arrival order does not count)."""
    return b"".join(parts[i] for i in range(total))


# ---------------------------------------------------------------------------- streams


def stream_message(headers: Mapping[str, str] | None, data: bytes, expected: int, subject: str) -> bool:
    """The stream rules for one message: True for the next chunk, False for the empty end.

    Raises the error a message carries (an error mid-stream, or the server's no-responders),
    and a TransportError when chunks were lost (its ``Natserve-Seq`` is not ``expected``).
    One call per message: it stands in the stream's loop for the checks it had inline.
    """
    if not headers:
        return bool(data)  # other senders may stream without sequence numbers
    if ERROR_CODE_HEADER in headers:
        raise_for_error(headers, data, subject)
    if not data:
        if headers.get(STATUS_HEADER) == "503":
            raise NoResponders(f"no service answers on {subject!r}", subject=subject)
        return False
    seq = headers.get(SEQ_HEADER)
    if seq is not None:
        try:
            number = int(seq)
        except ValueError:
            raise malformed(subject, f"{SEQ_HEADER} {seq!r} is not a number") from None
        if number != expected:
            raise TransportError(f"stream from {subject!r} lost chunks: got {seq}, expected {expected}")
    return True
