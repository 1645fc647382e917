"""``natserve up`` keeps its nats-server up: a killed server is started again and the pool serves
on; one that keeps dying makes ``up`` exit non-zero saying why. ``natserve up`` runs as a real
process, and its nats-server is SIGKILLed from here."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from broker_client import AsyncClient
from natserve.embedded import RESTARTS
from tests.support.cli import Running, cli_env
from tests.support.ports import free_port

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc"),
]


def new_server(up: Running, old: set[int], timeout: float = 20.0) -> int:
    """The pid of the nats-server ``up`` started after the ones in ``old`` (bounded wait)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fresh = set(up.children("nats-server")) - old
        if fresh:
            return fresh.pop()
        if up.proc.poll() is not None:
            raise AssertionError(f"natserve up exited with {up.proc.returncode}:\n{''.join(up.stderr[-20:])}")
        time.sleep(0.05)  # a bounded poll of /proc for the restarted server
    raise AssertionError(f"no new nats-server within {timeout:g} s:\n{''.join(up.stderr[-20:])}")


async def pool_answers(url: str) -> list[str]:
    """The ids of the live workers, once the registry answers again (bounded)."""
    async with AsyncClient(url, request_timeout=5) as client:
        deadline = time.monotonic() + 30
        while True:
            try:
                alive = [w["worker_id"] for w in await client.list_workers() if w["alive"]]
                if alive:
                    return alive
            except Exception:
                if time.monotonic() > deadline:
                    raise
            assert time.monotonic() < deadline, "the pool did not answer within 30 s of the restart"
            await asyncio.sleep(0.1)  # a bounded poll while the services reconnect


def test_a_killed_nats_server_is_started_again_until_it_keeps_dying(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    url = f"nats://127.0.0.1:{port}"
    env = cli_env(tmp_path, NATSERVE_WARM_UP="0", NATSERVE_HEARTBEAT_INTERVAL="0.5")
    monkeypatch.setenv("NATSERVE_HOME", env["NATSERVE_HOME"])
    up = Running(["up", "--port", str(port), "--device", "cpu"], env)
    try:
        up.wait_ready(60)
        assert asyncio.run(pool_answers(url))
        [first] = up.children("nats-server")
        killed = time.monotonic()
        os.kill(first, signal.SIGKILL)
        second = new_server(up, {first})
        assert any("starting it again (1 of" in line for line in up.stderr), "".join(up.stderr[-20:])
        assert any("WARNING" in line and "exited with code" in line for line in up.stderr)
        # The registry and the worker reconnected on their own: the pool serves.
        assert asyncio.run(pool_answers(url))
        print(f"the pool answered again {time.monotonic() - killed:.2f} s after its nats-server was killed")

        # Dying again and again without staying up (the first death counts): RESTARTS restarts
        # in a row, then up gives up.
        seen = {first, second}
        victim = second
        for _ in range(RESTARTS - 1):
            os.kill(victim, signal.SIGKILL)
            victim = new_server(up, seen)
            seen.add(victim)
        os.kill(victim, signal.SIGKILL)
        code = up.proc.wait(60)
        stderr = "".join(up.stderr)
        assert code == 1, stderr[-2000:]
        assert f"died {RESTARTS + 1} times in a row" in stderr
        assert "error: " in stderr and "nats-server.log" in stderr
        assert "Traceback" not in stderr
        assert not up.children("nats-server")
    finally:
        up.kill()
