"""A real nats-server for the tests: the process, and the fixtures that share or own one."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from natserve.embedded import nats_server_binary
from tests.support.ports import free_port, wait_for_port


class NatsServer:
    """One nats-server process; ``restart`` keeps the port so clients can reconnect."""

    def __init__(
        self,
        port: int | None = None,
        *,
        args: list[str] | None = None,
        config: str | None = None,
        jetstream: bool = True,
    ) -> None:
        self.port = port or free_port()
        self.jetstream = jetstream
        self.args = list(args or [])
        self.store = tempfile.mkdtemp(prefix="natserve-js-")
        if config is not None:
            # Options such as max_payload exist only in the config file, not as flags.
            conf = Path(self.store) / "nats.conf"
            conf.write_text(config)
            self.args += ["-c", str(conf)]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> NatsServer:
        self.proc = subprocess.Popen(
            [
                nats_server_binary(),
                "-a",
                "127.0.0.1",
                "-p",
                str(self.port),
                *(["-js", "-sd", self.store] if self.jetstream else []),
                *self.args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port, self.proc)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the server and remove its JetStream store."""
        self.stop()
        shutil.rmtree(self.store, ignore_errors=True)


@contextmanager
def running_nats_server(
    *, args: list[str] | None = None, config: str | None = None, jetstream: bool = True
) -> Iterator[NatsServer]:
    """A server of its own for the ``with`` block (flags in ``args``, options in ``config``;
    ``jetstream=False``: one without JetStream)."""
    server = NatsServer(args=args, config=config, jetstream=jetstream).start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def nats_server() -> Iterator[NatsServer]:
    with running_nats_server() as server:
        yield server


@pytest.fixture
def nats_url(nats_server: NatsServer) -> str:
    return nats_server.url


@pytest.fixture
def own_nats_server() -> Iterator[NatsServer]:
    """A server of the test's own, for tests that stop or restart it."""
    with running_nats_server() as server:
        yield server
