"""What the fuzz tests of the registry and the worker share: hypothesis strategies of wire
values (JSON and msgpack, nested past any parser's limit), the Content-Types to send them with,
and the check every reply must pass whatever was sent."""

from __future__ import annotations

import json
from typing import Any

import msgpack
from hypothesis import strategies as st
from nats.aio.msg import Msg

from broker_client.codec import JSON, MSGPACK, decode, detect
from broker_client.runtime import ERROR_CODE_HEADER, ERROR_HEADER

ALLOWED_ERROR_CODES = {"400", "404", "409", "429", "503", "504"}

MSGPACK_INT = st.integers(min_value=-(2**63), max_value=2**64 - 1)

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),  # beyond 64 bits too: JSON has no limit, pydantic and SQL do
    st.floats(),  # NaN and infinities: Python's JSON writes and reads them
    st.text(max_size=64),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=16), inner, max_size=6),
    max_leaves=24,
)
msgpack_scalars = st.one_of(
    st.none(),
    st.booleans(),
    MSGPACK_INT,
    st.floats(),
    st.text(max_size=64),
    st.binary(max_size=64),
    st.builds(msgpack.ExtType, st.integers(min_value=0, max_value=127), st.binary(max_size=16)),
    st.builds(msgpack.Timestamp, st.integers(min_value=0, max_value=2**32 - 1)),  # ext type -1
)
msgpack_values = st.recursive(
    msgpack_scalars,
    lambda inner: (
        st.lists(inner, max_size=6)
        | st.dictionaries(
            st.one_of(st.text(max_size=16), MSGPACK_INT, st.binary(max_size=8)), inner, max_size=6
        )
    ),
    max_leaves=24,
)


def nested_json(depth: int, kind: str) -> bytes:
    """``[[[..."x"...]]]`` or ``{"model": {"model": ...}}``, built as text: json.dumps would
    hit the recursion limit first."""
    if kind == "list":
        return b"[" * depth + b'"x"' + b"]" * depth
    return b'{"model": ' * depth + b'"x"' + b"}" * depth


def nested_msgpack(depth: int) -> bytes:
    return b"\x91" * depth + b"\xa1x"  # fixarray of one, ..., the string "x"


CONTENT_TYPES = [
    None,
    JSON,
    MSGPACK,
    "text/plain",
    "application/json; charset=utf-8",
    "",
    "application/x-msgpack",
]


def json_bytes(value: Any) -> bytes | None:
    try:
        return json.dumps(value, allow_nan=True).encode()
    except (ValueError, RecursionError):
        return None


def msgpack_bytes(value: Any) -> bytes | None:
    try:
        return msgpack.packb(value, use_bin_type=True)
    except (ValueError, OverflowError, TypeError):
        return None  # out of msgpack's range (huge ints, too deep): not a wire message


def check_reply(msg: Msg, subject: str, sent: bytes) -> None:
    """Any reply to ``sent`` on ``subject``: a decodable dict, or an error by the rules (a 4xx or
    503/504 with the headers and an ``{"error": {type, code, message}}`` body, no traceback)."""
    headers = dict(msg.headers or {})
    assert headers.get("Status") != "503", f"no responders on {subject}: the service is gone"
    text = msg.data.decode("utf-8", "replace") + " ".join(headers.values())
    assert "Traceback" not in text, text[:2000]
    code = headers.get(ERROR_CODE_HEADER)
    if code is None:
        body = decode(msg.data, detect(msg.data, msg.headers))
        assert isinstance(body, dict), f"{subject} answered {body!r}"
        return
    assert code != "500", f"500 on {subject} for {sent[:300]!r}: {headers.get(ERROR_HEADER)}"
    assert code in ALLOWED_ERROR_CODES, code
    assert headers.get(ERROR_HEADER), "an error reply needs a Nats-Service-Error line"
    assert "\n" not in headers[ERROR_HEADER]
    body = decode(msg.data, detect(msg.data, msg.headers))
    assert isinstance(body, dict) and isinstance(body.get("error"), dict), body
    error = body["error"]
    assert {"type", "code", "message"} <= set(error), error
    assert str(error["code"]) == code
    assert isinstance(error["message"], str) and error["message"]
