"""The pool tests' processes: natserve services as real processes on one nats-server.

``Service`` runs ``python -m natserve registry|worker ...`` with its settings in the environment
(as an operator would), its output in a log file that ``wait_ready`` watches for the ready line.
``Pool`` holds the services of one test (the ``pool`` fixture), on one prefix.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ECHO = "echo:"


def echo_definition(name: str, uri: str = ECHO, **extra: Any) -> dict[str, Any]:
    return {
        "version": 1,
        "model_name": name,
        "model_lang": ["en"],
        "model_ability": ["generate", "chat"],
        "context_length": 4096,
        "model_specs": [
            {
                "model_format": "pytorch",
                "model_size_in_billions": 1,
                "quantizations": ["none"],
                "model_uri": uri,
            }
        ],
        **extra,
    }


def words(n: int) -> str:
    return " ".join(f"w{i}" for i in range(n))


def service_env(tmp_path: Path, nats_url: str, prefix: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NATSERVE_")}
    env.update(
        NATSERVE_HOME=str(tmp_path / "home"),
        NATSERVE_NATS_URL=nats_url,
        NATSERVE_PREFIX=prefix,
        NATSERVE_LOG_LEVEL="INFO",
        NATSERVE_HEARTBEAT_INTERVAL="0.5",
        NATSERVE_DEAD_AFTER="2",
    )
    env.update(extra)
    return env


class Service:
    """One ``natserve`` service process."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "natserve", *args],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def tail(self, n: int = 25) -> str:
        return "\n".join(self.log().splitlines()[-n:])

    async def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while "ready on" not in self.log():
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} not ready within {timeout:g} s:\n{self.tail()}")
            await asyncio.sleep(0.05)  # bounded poll of its log for the ready line

    def signal(self, sig: signal.Signals) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    async def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} still running after {timeout:g} s:\n{self.tail()}")
            await asyncio.sleep(0.05)
        self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


class Pool:
    """Registries and workers as processes on one NATS server (or cluster) and prefix."""

    def __init__(self, tmp_path: Path, nats_url: str, prefix: str, db_url: str | None = None) -> None:
        self.tmp_path = tmp_path
        self.nats_url = nats_url
        self.prefix = prefix
        self.db_url = db_url or f"sqlite+aiosqlite:///{tmp_path / 'registry.db'}"
        self.services: list[Service] = []

    def registry(self, name: str = "registry", nats_url: str | None = None, **env: str) -> Service:
        service = Service(
            name,
            ["registry", "--db-url", self.db_url],
            service_env(self.tmp_path, nats_url or self.nats_url, self.prefix, **env),
            self.tmp_path,
        )
        self.services.append(service)
        return service

    def worker(self, worker_id: str, nats_url: str | None = None, **env: str) -> Service:
        service = Service(
            worker_id,
            ["worker", "--device", "cpu", "--worker-id", worker_id],
            service_env(self.tmp_path, nats_url or self.nats_url, self.prefix, **env),
            self.tmp_path,
        )
        self.services.append(service)
        return service

    def close(self) -> None:
        for service in self.services:
            service.kill()

    def logs(self) -> str:
        return "\n".join(f"--- {s.name}\n{s.tail(40)}" for s in self.services)


@pytest.fixture
def pool(tmp_path: Path, nats_url: str, unique: str) -> Iterator[Pool]:
    """A ``Pool`` on the shared nats-server under a prefix of the test's own; its services are
    killed afterwards."""
    p = Pool(tmp_path, nats_url, f"p{unique}")
    yield p
    p.close()
