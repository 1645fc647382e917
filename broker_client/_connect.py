"""Connecting to NATS with natserve's rules: keep reconnecting, refuse fast what no retry fixes.

``connect`` is how every natserve process gets its connection (``NATSConnection``, nats-py's
client): a list of servers or one comma-separated string, reconnects forever once connected, and
a first connect that the server refuses (wrong credentials, TLS) fails at once with a
``TransportError`` instead of nats-py's endless retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from typing import Any

import nats.errors
from nats.aio.client import Client as NATSConnection

from ._auth import IDENTITY_OPTIONS, LOCAL_TOKEN_FILE, is_local
from ._errors import TransportError

__all__ = ["NATSConnection", "connect"]

logger = logging.getLogger(__name__)


# Answers to a first connect that no retry can change: wrong credentials, a TLS mismatch.
_REFUSED_MARKERS = ("authorization violation", "authentication", "tls required", "secure connection")


def _is_refusal(exc: BaseException) -> bool:
    if isinstance(exc, ssl.SSLError):
        return True  # certificate not trusted, hostname mismatch, client certificate refused
    return isinstance(exc, nats.errors.Error) and any(m in str(exc).lower() for m in _REFUSED_MARKERS)


async def _discard(nc: NATSConnection) -> None:
    """Close a connection that never came up; bounded, as the close of a failed TLS
    handshake waits for a socket that nobody will close."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(nc.close(), 1.0)


class _Refused(Exception):
    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


async def connect(
    url: str | list[str],
    *,
    name: str,
    connect_timeout: float = 5.0,
    reconnect: bool = True,
    **options: Any,
) -> NATSConnection:
    """Connect with natserve's defaults: keep reconnecting, never give up silently.

    A first connect that the server refuses (bad credentials, TLS) fails at once with a
    TransportError; one that finds no server keeps trying (bound it with ``asyncio.wait_for``).
    """
    # "nats://a:4222,nats://b:4222" (one NATSERVE_NATS_URL for a cluster) is a list of servers.
    given = [url] if isinstance(url, str) else list(url)
    servers = [s.strip() for u in given for s in u.split(",") if s.strip()]
    first_connect = True

    async def _log_error(exc: Exception) -> None:
        logger.debug("nats connection error on %s: %r", servers, exc)

    user_error_cb = options.pop("error_cb", None) or _log_error

    async def _error_cb(exc: Exception) -> None:
        await user_error_cb(exc)
        if first_connect and _is_refusal(exc):
            # nats-py retries a refused first connect forever when reconnecting is on: it
            # cannot tell a wrong password from a server still starting. Raising from its
            # error callback is the one way out of that loop.
            raise _Refused(exc)

    async def _disconnected_cb() -> None:
        logger.info("disconnected from NATS %s", servers)

    async def _reconnected_cb() -> None:
        logger.info("reconnected to NATS %s", servers)

    options.setdefault("disconnected_cb", _disconnected_cb)
    options.setdefault("reconnected_cb", _reconnected_cb)
    settings: dict[str, Any] = {
        "servers": servers,
        "name": name,
        "connect_timeout": connect_timeout,
        "allow_reconnect": reconnect,
        # -1: keep trying while the server is away instead of giving up after 60 tries.
        "max_reconnect_attempts": -1 if reconnect else 0,
        "reconnect_time_wait": 0.5,
        "error_cb": _error_cb,
    }
    nc = NATSConnection()
    try:
        await nc.connect(**settings, **options)
    except _Refused as refused:
        await _discard(nc)
        hint = ""
        if is_local(servers) and not any(options.get(k) is not None for k in IDENTITY_OPTIONS):
            hint = (
                f"; a pool that `natserve up` runs takes the token it keeps in "
                f"$NATSERVE_HOME/{LOCAL_TOKEN_FILE} (set NATSERVE_HOME, or NATSERVE_NATS_TOKEN)"
            )
        raise TransportError(
            f"NATS at {', '.join(servers)} refused the connection of {name!r}: {refused.cause}{hint}"
        ) from refused.cause
    except BaseException as exc:
        await _discard(nc)
        if not isinstance(exc, Exception):
            raise  # cancellation (a caller's wait_for) stays a cancellation
        raise TransportError(f"cannot connect to NATS at {', '.join(servers)}: {exc}") from exc
    first_connect = False
    return nc
