"""The local pool's token: ``natserve up`` lets in only who holds it, and its own user finds it.

The rules without a server (which URLs are local, when the token is added, the file's mode),
then ``natserve up`` as a real process: a connection without the token is refused, the CLI and
the Python client of the same home get in with nothing configured, another home's client is
told where the token lives, the token is on no command line, and a restart keeps it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import sys
from pathlib import Path

import nats
import nats.errors
import pytest

from broker_client import LOCAL_TOKEN_FILE, AsyncClient, TransportError, local_token, with_local_token
from broker_client._auth import is_local
from natserve.pool_token import ensure_token
from tests.support.cli import Running, cli_env, natserve
from tests.support.ports import free_port

# ---------------------------------------------------------------------------- the rules


@pytest.mark.parametrize(
    ("url", "local"),
    [
        ("nats://127.0.0.1:4222", True),
        ("nats://localhost:4300", True),
        ("nats://[::1]:4222", True),
        ("127.0.0.1:4222", True),
        ("nats://127.0.0.1:4222,nats://127.0.0.2:4223", True),
        ("nats://10.0.0.5:4222", False),
        ("nats://nats.example.com:4222", False),
        ("nats://127.0.0.1:4222,nats://10.0.0.5:4222", False),  # the token would leave the machine
        ("nats://user:pw@127.0.0.1:4222", False),  # the URL has its identity
        ("", False),
    ],
)
def test_which_servers_are_local(url: str, local: bool) -> None:
    assert is_local(url) is local


def test_the_token_is_added_only_without_an_identity_and_for_local_servers(tmp_path: Path) -> None:
    token = ensure_token(tmp_path)
    local = "nats://127.0.0.1:4222"
    assert local_token(local, tmp_path) == token
    assert with_local_token(local, {"name": "x"}, tmp_path) == {"name": "x", "token": token}
    assert with_local_token([local], {}, tmp_path) == {"token": token}
    for identity in ({"token": "mine"}, {"user": "u", "password": "p"}, {"user_credentials": "/c"}):
        assert with_local_token(local, identity, tmp_path) == identity
    assert with_local_token("nats://10.0.0.5:4222", {}, tmp_path) == {}
    assert with_local_token(local, {}, tmp_path / "elsewhere") == {}


def test_the_token_file_is_private_and_kept(tmp_path: Path) -> None:
    home = tmp_path / "home"
    token = ensure_token(home)
    path = home / LOCAL_TOKEN_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    assert len(token) >= 40 and path.read_text().strip() == token
    assert ensure_token(home) == token  # a second start keeps it
    # One that others could read is replaced: whoever read it must not get in.
    path.chmod(0o644)
    fresh = ensure_token(home)
    assert fresh != token and stat.S_IMODE(path.stat().st_mode) == 0o600


# ---------------------------------------------------------------------------- natserve up


async def refused_without_the_token(url: str, other_home: Path) -> None:
    # Without it (another user of the machine): refused at once.
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await nats.connect(url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=5)
    # And the natserve client says where the token is.
    with pytest.MonkeyPatch.context() as env:
        env.setenv("NATSERVE_HOME", str(other_home))
        with pytest.raises(TransportError, match=f"NATSERVE_HOME/{LOCAL_TOKEN_FILE}"):
            await AsyncClient(url).connect()


async def let_in_from(url: str, home: Path) -> None:
    with pytest.MonkeyPatch.context() as env:
        env.setenv("NATSERVE_HOME", str(home))
        async with AsyncClient(url) as client:
            assert await client.list_models() == {}


async def let_in_with(url: str, token: str) -> None:
    nc = await nats.connect(url, token=token, connect_timeout=5)
    await nc.close()


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_up_takes_only_connections_with_its_token(tmp_path: Path) -> None:
    port = free_port()
    url = f"nats://127.0.0.1:{port}"
    env = cli_env(tmp_path, NATSERVE_WARM_UP="0")
    home = Path(env["NATSERVE_HOME"])
    path = home / LOCAL_TOKEN_FILE
    up = Running(["up", "--port", str(port), "--device", "cpu"], env)
    try:
        ready = up.wait_ready(60)
        assert str(path) in ready
        token = path.read_text().strip()
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        asyncio.run(refused_without_the_token(url, tmp_path / "another-home"))

        # The same user's Python client and CLI find it in the home.
        asyncio.run(let_in_from(url, home))
        result = natserve("--nats-url", url, "--json", "workers", tmp_path=tmp_path)
        assert result.returncode == 0, result.stderr
        # Shared by hand, it works from anywhere (NATSERVE_NATS_TOKEN, or token= in Python).
        elsewhere = tmp_path / "elsewhere"
        shared = natserve("--nats-url", url, "models", tmp_path=elsewhere, NATSERVE_NATS_TOKEN=token)
        assert shared.returncode == 0, shared.stderr

        # No command line shows it: every user can read those.
        for pid in [*up.children("nats-server"), up.proc.pid]:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            assert token not in cmdline
        up.proc.send_signal(signal.SIGINT)
        assert up.proc.wait(40) == 0, "".join(up.stderr[-30:])
    finally:
        up.kill()

    # A restart keeps the token, so the clients that have it keep working.
    up = Running(["up", "--port", str(port), "--device", "cpu"], env)
    try:
        up.wait_ready(60)
        assert path.read_text().strip() == token
        asyncio.run(let_in_with(url, token))
        assert os.stat(home / "nats-server.conf").st_mode & 0o077 == 0
    finally:
        up.kill()
