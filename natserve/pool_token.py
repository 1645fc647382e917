"""The local pool's token: what keeps other users of the machine off ``natserve up``'s server.

``natserve up`` starts its nats-server with token auth. The token is made on first start
(:func:`ensure_token`: 32 random bytes, URL-safe) and kept in ``$NATSERVE_HOME/nats.token`` with
mode 0600, in a home folder made with mode 0700, and the server reads it from a config file of
the same mode (never from its command line, which every user can read in ``/proc``). Clients and
CLI commands of the same user find it there (``broker_client.local_token``); to let someone else
in, give them the token (``NATSERVE_NATS_TOKEN=$(cat ~/.natserve/nats.token)``).
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
from pathlib import Path

from broker_client import LOCAL_TOKEN_FILE

__all__ = ["ensure_token", "write_private"]

logger = logging.getLogger(__name__)


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path``, readable and writable by this user only (0600)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # an older file keeps its mode through O_CREAT
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def ensure_token(home: Path) -> str:
    """The token of the pool in ``home``: read from its file, or made and stored on first start.

    A token file that other users may read is made private again, with a warning: whoever read
    it could reach the pool, so a new token is made too.
    """
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = home / LOCAL_TOKEN_FILE
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        mode = None
    if mode is not None:
        token = path.read_text().strip()
        if token and not mode & (stat.S_IRWXG | stat.S_IRWXO):
            return token
        if token:
            logger.warning(
                "%s was readable by other users (mode %o): made a new token, readable by you only",
                path,
                stat.S_IMODE(mode),
            )
    token = secrets.token_urlsafe(32)
    write_private(path, token + "\n")
    logger.info("made the pool's NATS token in %s (mode 0600)", path)
    return token
