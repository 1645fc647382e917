"""Optional API keys for the gateway, checked on ``Authorization: Bearer <key>``.

Keys come from ``NATSERVE_API_KEYS`` (separated by commas) and/or a file named by
``NATSERVE_API_KEYS_FILE`` (one key a line; blank lines and ``#`` comments are skipped). With
none, every request is let in: that is the default, meant for a gateway on 127.0.0.1. A browser
cannot send a bearer token, so the pool page also takes HTTP Basic credentials whose password is
a key (any user name); a 401 on ``GET /`` asks the browser for them.

The keys are kept as SHA-256 digests and a presented key is looked up by its digest: the check
costs the same whatever the key, and the keys themselves are not held in memory.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Iterable
from pathlib import Path

from .errors import Unauthorized

__all__ = ["ApiKeys", "load_api_keys"]


class ApiKeys:
    """The accepted keys; ``check`` raises :class:`Unauthorized` for a request without one."""

    __slots__ = ("_digests",)

    def __init__(self, keys: Iterable[str] = ()) -> None:
        self._digests = frozenset(hashlib.sha256(k.encode()).digest() for k in keys if k)

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def __len__(self) -> int:
        return len(self._digests)

    def check(self, authorization: bytes | None) -> None:
        """Pass when keys are off or ``authorization`` (the raw header) carries a valid key."""
        if not self._digests:
            return
        if not authorization:
            raise Unauthorized("this gateway needs an API key: send Authorization: Bearer <key>")
        scheme, _, credentials = authorization.partition(b" ")
        scheme = scheme.lower()
        key = credentials.strip()
        if scheme == b"basic":
            try:
                key = base64.b64decode(key, validate=True).partition(b":")[2]
            except (binascii.Error, ValueError):
                key = b""
        elif scheme != b"bearer":
            raise Unauthorized("the Authorization header must be 'Bearer <key>'")
        if hashlib.sha256(key).digest() not in self._digests:
            raise Unauthorized("the API key is not valid for this gateway")


def load_api_keys(keys: str | None, keys_file: Path | None) -> ApiKeys:
    """The keys of ``NATSERVE_API_KEYS`` and ``NATSERVE_API_KEYS_FILE``; ValueError naming the
    file when it cannot be read or holds no key."""
    found = [k.strip() for k in (keys or "").split(",") if k.strip()]
    if keys_file is not None:
        try:
            text = Path(keys_file).expanduser().read_text()
        except OSError as exc:
            raise ValueError(f"cannot read the API keys file {keys_file}: {exc.strerror or exc}") from exc
        from_file = [
            line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")
        ]
        if not from_file:
            raise ValueError(f"the API keys file {keys_file} holds no key")
        found += from_file
    return ApiKeys(found)
