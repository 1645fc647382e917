#!/usr/bin/env python3
"""Container healthcheck: does a natserve service answer its nats.micro ping?

    python healthcheck.py natserve-registry
    python healthcheck.py natserve-worker --this-host

Sends ``$SRV.PING.<service>`` on ``NATSERVE_NATS_URL`` (with the ``NATSERVE_NATS_*`` auth and TLS
variables of ``broker_client.NatsAuth``, the same ones the service itself uses) and exits 0 when an
instance answers within ``--timeout`` seconds, 1 otherwise (no server, refused credentials, no
answer), with one line saying why: ``docker inspect`` shows it.

Every instance of a service answers the same ping, so a worker's check passes ``--this-host``:
only an instance whose metadata ``host`` is this machine's hostname counts (a container's
hostname is its own), or any other worker would keep a dead one looking healthy. The registry
runs as one instance, so its name is enough.

A healthcheck must not hang and must not linger: one connection attempt, no reconnects, every
step bounded by the one timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import time
from typing import Any

import nats
import nats.errors

DEFAULT_URL = "nats://127.0.0.1:4222"


def _auth_options() -> dict[str, Any]:
    from broker_client import NatsAuth, connect_options

    return connect_options(NatsAuth.from_env())


async def _check(service: str, url: str, timeout: float, host: str | None) -> str:
    """The answering instance's description; raises with the reason otherwise."""
    deadline = time.monotonic() + timeout
    failures: list[str] = []

    async def on_error(exc: Exception) -> None:
        failures.append(f"{type(exc).__name__}: {exc}")

    nc = await nats.connect(
        servers=[url],
        name=f"natserve-healthcheck-{service}",
        connect_timeout=max(0.1, timeout / 2),
        allow_reconnect=False,
        # One retry, then nats-py gives up: with 0 it would retry a refused socket forever.
        max_reconnect_attempts=1,
        reconnect_time_wait=0.05,
        error_cb=on_error,
        **_auth_options(),
    )
    try:
        answers: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

        async def on_answer(msg: Any) -> None:
            try:
                answers.put_nowait(json.loads(msg.data))
            except ValueError:
                pass  # not a micro ping answer

        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox, cb=on_answer)
        await nc.publish(f"$SRV.PING.{service}", b"", reply=inbox)
        await asyncio.wait_for(nc.flush(), max(0.1, deadline - time.monotonic()))
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                answer = await asyncio.wait_for(answers.get(), remaining)
            except TimeoutError:
                break
            metadata = answer.get("metadata") or {}
            if host is None or metadata.get("host") == host:
                return f"{answer.get('name')} {answer.get('id')} (version {answer.get('version')})"
        await sub.unsubscribe()
        where = f" from host {host!r}" if host else ""
        detail = f"; {failures[-1]}" if failures else ""
        raise RuntimeError(f"no {service} instance{where} answered $SRV.PING within {timeout:g} s{detail}")
    finally:
        # Bounded: closing after a failed TLS handshake can wait on a socket forever.
        try:
            await asyncio.wait_for(nc.close(), 0.5)
        except Exception:
            pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("service", help="nats.micro service name: natserve-registry or natserve-worker")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds for the whole check")
    parser.add_argument(
        "--this-host",
        action="store_true",
        help="only an instance whose metadata host is this machine's hostname counts",
    )
    args = parser.parse_args(argv)
    url = os.environ.get("NATSERVE_NATS_URL") or DEFAULT_URL
    host = socket.gethostname() if args.this_host else None
    try:
        # The outer bound also covers DNS, TCP and TLS, which nats-py bounds only per step.
        found = asyncio.run(asyncio.wait_for(_check(args.service, url, args.timeout, host), args.timeout + 1))
    except Exception as exc:
        reason = str(exc) or type(exc).__name__
        if isinstance(exc, TimeoutError):
            reason = f"no answer from NATS at {url} within {args.timeout:g} s"
        elif isinstance(exc, nats.errors.NoServersError | OSError):
            reason = f"cannot reach NATS at {url}: {reason}"
        print(f"unhealthy: {args.service}: {reason}", file=sys.stderr)
        return 1
    print(f"healthy: {found}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
