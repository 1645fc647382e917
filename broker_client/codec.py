"""Encoding of message bodies: msgpack or JSON, chosen per request.

A request names its encoding in ``Content-Type``; without the header a body whose first
non-blank byte is ``{`` or ``[`` is JSON and anything else is msgpack, so that ``nats req``
with a JSON literal just works. An empty body means "no parameters"; without a header it
counts as JSON, so that ``nats req subject ""`` gets a readable reply. Replies use the
request's encoding.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Mapping
from typing import Any

import msgpack

from ._errors import BadRequest

__all__ = [
    "CONTENT_TYPE",
    "JSON",
    "MSGPACK",
    "decode",
    "detect",
    "detect_unambiguous",
    "encode",
]

CONTENT_TYPE = "Content-Type"
JSON = "application/json"
MSGPACK = "application/msgpack"
_JSON_STARTS = frozenset(b"{[")
# The two values natserve itself sends, looked up before any parsing of the header.
_EXACT = {JSON: JSON, MSGPACK: MSGPACK}
_BLANK = b" \t\r\n"
# A \uD800-\uDFFF escape: JSON can spell a lone UTF-16 surrogate, Unicode text cannot hold one.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def detect(data: bytes, headers: Mapping[str, str] | None = None) -> str:
    """The content type of a body: the header when present, else sniffed from the first byte."""
    if headers:
        declared = headers.get(CONTENT_TYPE) or headers.get("content-type")
        if declared:
            known = _EXACT.get(declared)
            if known is not None:
                return known
            base = declared.split(";", 1)[0].strip().lower()
            if base in (JSON, "text/json"):
                return JSON
            if base in (MSGPACK, "application/x-msgpack", "application/vnd.msgpack"):
                return MSGPACK
            raise BadRequest(f"Content-Type {declared!r} is not supported: use {JSON!r} or {MSGPACK!r}")
    stripped = data.lstrip(_BLANK)
    if not stripped or stripped[0] in _JSON_STARTS:
        return JSON
    return MSGPACK


def detect_unambiguous(data: bytes, content_type: str) -> bool:
    """Whether :func:`detect` reads ``data`` as ``content_type`` without a header, so that a
    sender may leave the header out: JSON that starts with ``{`` or ``[``, msgpack whose first
    byte is not one of those or a blank (maps, arrays and strings start at 0x80 and above)."""
    if not data:
        return content_type == JSON
    first = data[0]
    if content_type == JSON:
        return first in _JSON_STARTS
    return first >= 0x80 or (first not in _JSON_STARTS and first not in _BLANK)


def decode(data: bytes, content_type: str) -> Any:
    """Decode a body; an empty or blank body is ``{}``. Garbage is a BadRequest saying why."""
    if not data or (data[0] in _BLANK and not data.strip(_BLANK)):
        return {}
    if content_type == JSON:
        try:
            value = json.loads(data)
            if _SURROGATE_ESCAPE.search(data):
                # Python decodes a lone surrogate into a str that no tokenizer, database or
                # UTF-8 encoder takes (found by fuzzing the worker: a 500 from the tokenizer).
                json.dumps(value, ensure_ascii=False).encode("utf-8")
            return value
        except UnicodeEncodeError as exc:
            raise BadRequest(
                f"malformed JSON body: a string holds a lone UTF-16 surrogate "
                f"({exc.object[exc.start : exc.end]!a}), which is not Unicode text"
            ) from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise BadRequest(f"malformed JSON body: {exc}") from exc
        except RecursionError:
            # Python's decoder recurses per level: thousands of '[' would otherwise be a 500.
            raise BadRequest("malformed JSON body: nested too deeply") from None
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types for garbage
        detail = str(exc) or "not valid msgpack"
        raise BadRequest(
            f"malformed msgpack body ({type(exc).__name__}: {detail}); "
            "send a JSON object (starting with '{') or set Content-Type"
        ) from exc


def _default(obj: Any) -> Any:
    # pydantic models and numpy/torch scalars reach the codec from services.
    dump = getattr(obj, "model_dump", None)
    if dump is not None:
        return dump(mode="json")
    item = getattr(obj, "item", None)
    if item is not None:
        return item()
    tolist = getattr(obj, "tolist", None)
    if tolist is not None:
        return tolist()
    raise TypeError(f"cannot encode {type(obj).__name__}")


# One Packer per thread: msgpack.packb builds a new one per call, a cost paid by every
# message (a Packer resets its buffer after each pack, and after an error).
_packers = threading.local()


def encode(obj: Any, content_type: str) -> bytes:
    if content_type == JSON:
        return json.dumps(obj, default=_default, ensure_ascii=False, separators=(",", ":")).encode()
    try:
        packer = _packers.packer
    except AttributeError:
        packer = _packers.packer = msgpack.Packer(default=_default, use_bin_type=True)
    return packer.pack(obj)  # type: ignore[no-any-return]
