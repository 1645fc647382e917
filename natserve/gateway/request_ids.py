"""Request ids: the caller's ``X-Request-Id``, or one made here; passed on as natserve's.

The id goes into the natserve request (``request_id``), so one request can be followed from the
HTTP client through the worker's logs and cancelled by it, and it comes back in the response's
``X-Request-Id``. natserve takes ids of at most 128 characters; a caller's id that is longer or
holds characters other than visible ASCII is a 400 naming the header.
"""

from __future__ import annotations

import itertools
import re
import uuid

from .errors import InvalidField

__all__ = ["MAX_REQUEST_ID", "new_request_id", "request_id"]

MAX_REQUEST_ID = 128

# A random prefix per process and a counter, as the natserve client makes its ids: unique
# across gateways, and cheaper than a uuid4 per request.
_PREFIX = "gw-" + uuid.uuid4().hex[:16]
_COUNTER = itertools.count(1)
_VALID = re.compile(rb"[\x21-\x7e]{1,%d}" % MAX_REQUEST_ID)


def new_request_id() -> str:
    return f"{_PREFIX}{next(_COUNTER):08x}"


def request_id(header: bytes | None) -> str:
    """The id for a request whose ``X-Request-Id`` is ``header`` (None when it sent none)."""
    if not header:
        return new_request_id()
    if _VALID.fullmatch(header) is None:
        raise InvalidField(
            f"X-Request-Id must be 1 to {MAX_REQUEST_ID} visible ASCII characters, got {header[:40]!r}",
            param="X-Request-Id",
        )
    return header.decode("ascii")
