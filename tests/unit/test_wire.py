"""The wire rules above the codec (``broker_client.wire``), without a server: errors both
ways, reply parts, stream order."""

from __future__ import annotations

import json
from typing import Any

import msgpack
import pytest
from pydantic import BaseModel, ValidationError

from broker_client import (
    BadRequest,
    Conflict,
    InternalError,
    NoResponders,
    NotFound,
    Overloaded,
    ProtocolError,
    RequestTimeout,
    ServerTimeout,
    ServiceError,
    TransportError,
    Unavailable,
    wire,
)
from broker_client.codec import JSON, MSGPACK

SUBJECT = "natserve.model.m1.generate"


def error_reply(code: int, type_name: str, message: str) -> tuple[dict[str, str], bytes]:
    body = json.dumps({"error": {"type": type_name, "code": code, "message": message}}).encode()
    headers = {
        "Content-Type": JSON,
        wire.ERROR_CODE_HEADER: str(code),
        wire.ERROR_HEADER: message,
    }
    return headers, body


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("code", "type_name", "cls"),
    [
        (400, "BadRequest", BadRequest),
        (404, "NotFound", NotFound),
        (409, "Conflict", Conflict),
        (429, "Overloaded", Overloaded),
        (500, "InternalError", InternalError),
        (503, "Unavailable", Unavailable),
        (504, "ServerTimeout", ServerTimeout),
    ],
)
def test_an_error_reply_raises_its_type(code: int, type_name: str, cls: type[ServiceError]) -> None:
    headers, body = error_reply(code, type_name, f"no luck for 'm1' ({code})")
    with pytest.raises(cls) as info:
        wire.raise_for_error(headers, body, SUBJECT)
    assert type(info.value) is cls and info.value.code == code
    assert info.value.message == f"no luck for 'm1' ({code})"


def test_the_body_wins_over_the_header_line_and_the_code_alone_is_enough() -> None:
    headers, body = error_reply(409, "Conflict", "uid 'm1' is taken, in full")
    headers[wire.ERROR_HEADER] = "uid taken"
    with pytest.raises(Conflict, match="in full"):
        wire.raise_for_error(headers, body, SUBJECT)
    # No body (or one that does not decode): the headers say enough.
    for data in (b"", b"\xc1 not msgpack"):
        with pytest.raises(NotFound, match="gone"):
            wire.raise_for_error({wire.ERROR_CODE_HEADER: "404", wire.ERROR_HEADER: "gone"}, data, SUBJECT)
    # A code that is not a number is a 500; a message-less error names the subject.
    with pytest.raises(InternalError, match=SUBJECT):
        wire.raise_for_error({wire.ERROR_CODE_HEADER: "teapot"}, b"", SUBJECT)


def test_no_responders_and_plain_replies() -> None:
    with pytest.raises(NoResponders) as info:
        wire.raise_for_error({wire.STATUS_HEADER: "503"}, b"", SUBJECT)
    assert info.value.subject == SUBJECT
    # Anything without an error header is a reply.
    wire.raise_for_error(None, b'{"ok":true}', SUBJECT)
    wire.raise_for_error({"Content-Type": JSON, wire.SEQ_HEADER: "1"}, b"{}", SUBJECT)


def test_errors_go_out_as_the_client_reads_them() -> None:
    for raised, code in [
        (Overloaded("replica 'm1' is full"), 429),
        (RequestTimeout("no reply", subject=SUBJECT, timeout=1.0), 504),
        (ProtocolError("bad bytes", subject=SUBJECT), 500),
        (ZeroDivisionError("division by zero"), 500),
    ]:
        err = wire.as_service_error(raised, SUBJECT)
        assert isinstance(err, ServiceError) and err.code == code
        headers = wire.error_headers(err, MSGPACK, 0)
        assert headers[wire.ERROR_CODE_HEADER] == str(code) and wire.SEQ_HEADER not in headers
        body = msgpack.packb(err.to_wire())
        with pytest.raises(ServiceError) as info:
            wire.raise_for_error(headers, body, SUBJECT)
        assert info.value.code == code and type(info.value) is type(err)
    # An unexpected exception names its type and the subject, in one line.
    assert "ZeroDivisionError" in err.message and SUBJECT in err.message


def test_a_validation_error_is_a_400_naming_the_field() -> None:
    class Limits(BaseModel):
        max_tokens: int

    with pytest.raises(ValidationError) as info:
        Limits.model_validate({"max_tokens": "many"})
    err = wire.as_service_error(info.value, SUBJECT)
    assert isinstance(err, BadRequest) and "max_tokens" in err.message


def test_the_error_line_is_one_bounded_line_and_follows_the_stream() -> None:
    err = InternalError("first line\nsecond\tline " + "x" * 5000)
    headers = wire.error_headers(err, JSON, 3)
    line = headers[wire.ERROR_HEADER]
    assert "\n" not in line and "\t" not in line and len(line) == 1000
    assert line.startswith("first line second line")
    # After three chunks the error is the fourth message of the stream.
    assert headers[wire.SEQ_HEADER] == "4"


@pytest.mark.parametrize("content_type", [JSON, MSGPACK])
@pytest.mark.parametrize("text", ["x", "é", "\u2603", '"'])
def test_an_error_body_too_large_is_cut_to_fit_and_says_so(content_type: str, text: str) -> None:
    limit = 4096
    err = BadRequest("; ".join(f"model_specs[{i}]: {text * 8}" for i in range(20_000)))
    data = wire.error_body(err, content_type, limit)
    assert len(data) <= limit
    body = json.loads(data) if content_type == JSON else msgpack.unpackb(data)
    message = body["error"]["message"]
    assert body["error"]["code"] == 400 and body["error"]["type"] == "BadRequest"
    assert message.startswith("model_specs[0]: ") and "more characters cut" in message
    # Cut no more than it had to: most of the room holds the message.
    assert len(data) > limit - 200


def test_an_error_body_that_fits_is_sent_whole() -> None:
    err = NotFound("model_uid 'm1' is not running")
    assert wire.error_body(err, JSON, 1 << 20) == json.dumps(err.to_wire(), separators=(",", ":")).encode()


def test_headers_size_counts_what_the_server_counts() -> None:
    headers = {"Content-Type": JSON, wire.ERROR_CODE_HEADER: "400", wire.ERROR_HEADER: "d\u00e9j\u00e0"}
    # NATS/1.0\r\n, one "Name: value\r\n" per header, then \r\n; values in UTF-8.
    expected = 10 + sum(len(k) + 2 + len(v.encode()) + 2 for k, v in headers.items()) + 2
    assert wire.headers_size(headers) == expected


# ---------------------------------------------------------------------------- parts


@pytest.mark.parametrize("size", [1, 3000, 3072, 10_000])
def test_parts_split_and_join_back(size: int) -> None:
    data = bytes(i % 251 for i in range(size))
    max_payload = 1024 + 1024  # room for 1024 bytes of data per part
    parts = wire.split_parts(data, max_payload, MSGPACK)
    assert len(parts) == -(-size // 1024)
    assert all(len(part) + 1024 <= max_payload for part, _ in parts)
    received: dict[int, bytes] = {}
    for part, headers in reversed(parts):  # in any order
        assert headers["Content-Type"] == MSGPACK
        total = wire.parts_total(headers, SUBJECT)
        received[wire.part_index(headers, len(received), total, SUBJECT)] = part
    assert wire.join_parts(received, len(parts)) == data


def test_parts_headers_that_break_the_rules_are_protocol_errors() -> None:
    with pytest.raises(ProtocolError, match="Natserve-Parts 'two'"):
        wire.parts_total({wire.PARTS_HEADER: "two"}, SUBJECT)
    with pytest.raises(ProtocolError, match="Natserve-Parts 0"):
        wire.parts_total({wire.PARTS_HEADER: "0"}, SUBJECT)
    with pytest.raises(ProtocolError, match=r"outside 0\.\.2"):
        wire.part_index({wire.PART_HEADER: "3"}, 0, 3, SUBJECT)
    with pytest.raises(ProtocolError, match="'x' is not a number") as info:
        wire.part_index({wire.PART_HEADER: "x"}, 0, 3, SUBJECT)
    assert info.value.subject == SUBJECT and not isinstance(info.value, BadRequest)
    # Without an index a part takes the next place.
    assert wire.part_index(None, 2, 3, SUBJECT) == 2
    with pytest.raises(ValueError, match="max_payload 100"):
        wire.split_parts(b"data", 100, JSON)


# ---------------------------------------------------------------------------- streams


def chunk_headers(seq: int | str) -> dict[str, str]:
    return {"Content-Type": JSON, wire.SEQ_HEADER: str(seq)}


def test_a_stream_is_its_chunks_in_order_then_the_empty_end() -> None:
    assert wire.stream_message(chunk_headers(1), b"{}", 1, SUBJECT) is True
    assert wire.stream_message(chunk_headers(2), b"{}", 2, SUBJECT) is True
    assert wire.stream_message({}, b"", 3, SUBJECT) is False
    assert wire.stream_message(None, b"", 3, SUBJECT) is False
    # Other senders may stream without sequence numbers.
    assert wire.stream_message(None, b"{}", 1, SUBJECT) is True
    assert wire.stream_message({"Content-Type": JSON}, b"{}", 7, SUBJECT) is True


def test_a_gap_a_bad_sequence_number_and_errors_mid_stream() -> None:
    with pytest.raises(TransportError, match="lost chunks: got 3, expected 2"):
        wire.stream_message(chunk_headers(3), b"{}", 2, SUBJECT)
    with pytest.raises(ProtocolError, match="Natserve-Seq 'one'"):
        wire.stream_message(chunk_headers("one"), b"{}", 1, SUBJECT)
    headers, body = error_reply(500, "InternalError", "CUDA out of memory")
    with pytest.raises(InternalError, match="CUDA out of memory"):
        wire.stream_message({**headers, wire.SEQ_HEADER: "2"}, body, 2, SUBJECT)
    # An error with an empty body is an error, not the end.
    with pytest.raises(Unavailable):
        wire.stream_message({wire.ERROR_CODE_HEADER: "503"}, b"", 1, SUBJECT)
    with pytest.raises(NoResponders):
        wire.stream_message({wire.STATUS_HEADER: "503"}, b"", 1, SUBJECT)


def test_malformed_names_the_subject_and_the_reason() -> None:
    err = wire.malformed(SUBJECT, BadRequest("malformed msgpack body (ExtraData)"))
    assert isinstance(err, ProtocolError) and err.subject == SUBJECT
    assert str(err) == f"malformed reply on {SUBJECT!r}: malformed msgpack body (ExtraData)"
    assert wire.malformed(SUBJECT, "no model_uid").message.endswith(": no model_uid")


def test_header_names_are_the_documented_ones() -> None:
    names: dict[str, Any] = {
        "SEQ_HEADER": "Natserve-Seq",
        "PARTS_HEADER": "Natserve-Parts",
        "PART_HEADER": "Natserve-Part",
        "REQUEST_ID_HEADER": "Natserve-Request-Id",
        "ACK_HEADER": "Natserve-Ack",
        "ACCEPTED_HEADER": "Natserve-Accepted",
        "HOPS_HEADER": "Natserve-Hops",
        "ERROR_HEADER": "Nats-Service-Error",
        "ERROR_CODE_HEADER": "Nats-Service-Error-Code",
    }
    assert {name: getattr(wire, name) for name in names} == names
