"""The ``natserve`` command, run as a subprocess as users run it (the settings it builds, alone:
tests/unit/test_settings.py)."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker_client import Client, GenerateModelHandle
from natserve.embedded import port_in_use
from tests.support.cli import Running, assert_one_error_line, cli_env, natserve
from tests.support.fake_services import NSQL_2B, FakeNats, completion, decode, replier, streamer
from tests.support.models import NSQL_REPO_ID
from tests.support.nats_server import NatsServer
from tests.support.ports import free_port

COMMANDS = [
    "up",
    "gateway",
    "registry",
    "worker",
    "register",
    "unregister",
    "registrations",
    "launch",
    "models",
    "describe",
    "terminate",
    "workers",
    "generate",
    "chat",
    "embed",
    "db",
]


def test_help_lists_the_commands(tmp_path: Path) -> None:
    result = natserve("--help", tmp_path=tmp_path)
    assert result.returncode == 0
    for command in COMMANDS:
        assert f"    {command} " in result.stdout, command
    for option in ("--nats-url", "--prefix", "--json"):
        assert option in result.stdout


def test_up_refuses_a_taken_port(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        result = natserve("up", "--port", str(port), tmp_path=tmp_path)
    line = assert_one_error_line(result, code=2)
    assert time.monotonic() - started < 10
    assert f"port {port}" in line and "already in use" in line
    assert "natserve up --port " in line
    assert f"natserve up --nats-url nats://127.0.0.1:{port}" in line
    assert not (tmp_path / "home" / "jetstream").exists(), "nothing may start"


def test_db_upgrade_creates_the_tables(tmp_path: Path) -> None:
    db = tmp_path / "registry.db"
    result = natserve("db", "upgrade", "--db-url", f"sqlite+aiosqlite:///{db}", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "latest revision" in result.stdout
    with sqlite3.connect(db) as conn:
        tables = {row[0] for row in conn.execute("select name from sqlite_master where type='table'")}
    assert {"alembic_version", "registrations", "models", "replicas", "workers"} <= tables
    # Twice is fine: already at head.
    again = natserve("db", "upgrade", "--db-url", f"sqlite+aiosqlite:///{db}", tmp_path=tmp_path)
    assert again.returncode == 0, again.stderr


def test_operator_command_without_a_registry_is_one_error_line(tmp_path: Path, nats_url: str) -> None:
    result = natserve("--nats-url", nats_url, "--prefix", "nobodyhere", "models", tmp_path=tmp_path)
    line = assert_one_error_line(result)
    assert "no natserve registry answers" in line and "'nobodyhere'" in line


def test_operator_command_without_a_server(tmp_path: Path) -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    result = natserve("workers", tmp_path=tmp_path, NATSERVE_NATS_URL=url)
    line = assert_one_error_line(result)
    assert f"cannot connect to NATS at {url}" in line


def test_register_checks_the_file_first(tmp_path: Path) -> None:
    missing = assert_one_error_line(natserve("register", str(tmp_path / "nope.json"), tmp_path=tmp_path))
    assert "nope.json" in missing
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**NSQL_2B, "model_specs": []}))
    # Validated locally: the message names the field although no server is reachable.
    url = f"nats://127.0.0.1:{free_port()}"
    line = assert_one_error_line(natserve("--nats-url", url, "register", str(bad), tmp_path=tmp_path))
    assert "model_specs" in line


@pytest.fixture
def fake_cli(nats_url: str, unique: str) -> Iterator[FakeNats]:
    fake = FakeNats(nats_url, f"cli{unique}")
    yield fake
    fake.close()


def test_generate_stream_prints_tokens(tmp_path: Path, nats_url: str, fake_cli: FakeNats) -> None:
    fake_cli.describe("m1", abilities=["generate"])
    fake_cli.on(fake_cli.subjects.model("m1", "generate"), streamer(["SELECT", " 1", ";"]))
    result = natserve(
        "--nats-url", nats_url, "--prefix", fake_cli.subjects.prefix,
        "generate", "m1", "-- one", "--stream", "--max-tokens", "5", "--seed", "7",
        tmp_path=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == "SELECT 1;\n"
    [request] = fake_cli.received[fake_cli.subjects.model("m1", "generate")]
    assert decode(request)["generate_config"] == {"max_tokens": 5, "seed": 7, "stream": True}


def test_json_output(tmp_path: Path, nats_url: str, fake_cli: FakeNats) -> None:
    fake_cli.describe("m1", abilities=["generate"])
    fake_cli.on(fake_cli.subjects.model("m1", "generate"), replier(completion("SELECT 2;")))
    models = {"m1": {"model_uid": "m1", "model_name": "nsql-2B", "model_type": "LLM"}}
    fake_cli.on(fake_cli.subjects.models_list, replier({"models": models}))
    base = ["--nats-url", nats_url, "--prefix", fake_cli.subjects.prefix]
    listed = natserve(*base, "models", "--json", tmp_path=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout) == models
    generated = natserve(*base, "--json", "generate", "m1", "hi", tmp_path=tmp_path)
    assert json.loads(generated.stdout)["choices"][0]["text"] == "SELECT 2;"
    plain = natserve(*base, "generate", "m1", "hi", tmp_path=tmp_path)
    assert plain.stdout == "SELECT 2;\n"


# ---------------------------------------------------------------------------- natserve up, end to end


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_up_end_to_end(tmp_path: Path, hf_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    env = cli_env(
        tmp_path,
        HF_HUB_CACHE=str(hf_cache),
        HF_HUB_OFFLINE="1",
        NATSERVE_LOG_LEVEL="INFO",
    )
    # This process is the same user's client: it finds the pool's token in the same home.
    monkeypatch.setenv("NATSERVE_HOME", env["NATSERVE_HOME"])
    up = Running(["up", "--port", str(port), "--device", "cpu", "--no-http"], env)
    try:
        started = time.monotonic()
        ready = up.wait_ready(timeout=60)
        startup = time.monotonic() - started
        url = f"nats://127.0.0.1:{port}"
        assert url in ready
        print(f"natserve up ready in {startup:.1f} s: {ready.strip()}")
        [nats_pid] = up.children("nats-server")

        # The seed, as DESIGN.md's client section writes it; the tiny llama stands in for
        # NumbersStation/nsql-2B in an offline Hugging Face cache.
        with Client(url, timeout=120) as client:
            client.register_model(model_type="LLM", model=json.dumps(NSQL_2B), persist=False)
            assert [r["model_name"] for r in client.list_model_registrations("LLM")] == ["nsql-2B"]
            launching = time.monotonic()
            uid = client.launch_model(model_name="nsql-2B", progress=False)
            print(f"launched {uid} in {time.monotonic() - launching:.1f} s")
            model = client.get_model(model_uid=uid)
            assert isinstance(model, GenerateModelHandle)
            completion = model.generate(prompt="SELECT", generate_config={"max_tokens": 8})
            assert isinstance(completion, dict)
            assert completion["object"] == "text_completion"
            assert completion["usage"]["completion_tokens"] <= 8
            chunks = list(model.generate(prompt="SELECT", generate_config={"stream": True, "max_tokens": 4}))
            assert 1 <= len(chunks) <= 5
            assert uid in client.list_models()
            assert client.describe_model(model_uid=uid)["model_id"] == NSQL_REPO_ID
            [worker] = client.list_workers()
            assert [r["model_uid"] for r in worker["replicas"]] == [uid]

        stopping = time.monotonic()
        up.proc.send_signal(signal.SIGINT)
        code = up.proc.wait(timeout=40)
        stop_time = time.monotonic() - stopping
        assert code == 0, "".join(up.stderr[-30:])
        print(f"stopped in {stop_time:.1f} s")
        assert stop_time < 30, f"stopping took {stop_time:.1f} s"
        with pytest.raises(ProcessLookupError):
            os.kill(nats_pid, 0)
        assert not port_in_use(port)
        assert "Traceback" not in "".join(up.stderr)
    finally:
        up.kill()


def test_cli_uses_the_nats_credentials_from_the_environment(tmp_path: Path) -> None:
    server = NatsServer(args=["--user", "client", "--pass", "s3cret"]).start()
    try:
        base = ["--nats-url", server.url, "--prefix", "authtest", "models"]
        # Authenticated: the connection works, and the missing registry is what is reported.
        ok = natserve(*base, tmp_path=tmp_path, NATSERVE_NATS_USER="client", NATSERVE_NATS_PASSWORD="s3cret")
        assert "no natserve registry answers" in assert_one_error_line(ok)
        started = time.monotonic()
        refused = natserve(
            *base, tmp_path=tmp_path, NATSERVE_NATS_USER="client", NATSERVE_NATS_PASSWORD="wrong"
        )
        line = assert_one_error_line(refused)
        assert "refused" in line.lower() or "authorization" in line.lower()
        assert "wrong" not in line, "the password must not be echoed"
        assert time.monotonic() - started < 10
        half = natserve(*base, tmp_path=tmp_path, NATSERVE_NATS_PASSWORD="s3cret")
        assert_one_error_line(half, code=2)
    finally:
        server.close()


def test_registry_and_worker_processes(tmp_path: Path, nats_url: str, unique: str) -> None:
    prefix = f"proc{unique}"
    env = cli_env(tmp_path, NATSERVE_NATS_URL=nats_url, NATSERVE_PREFIX=prefix)
    registry = Running(["registry", "--db-url", f"sqlite+aiosqlite:///{tmp_path / 'r.db'}"], env)
    worker = Running(["worker", "--device", "cpu", "--worker-id", f"w-{unique}"], env)
    try:
        assert nats_url in registry.wait_ready(timeout=60)
        assert nats_url in worker.wait_ready(timeout=60)
        echo = tmp_path / "echo.json"
        echo.write_text(
            json.dumps(
                {
                    "version": 1,
                    "model_name": "echo",
                    "model_ability": ["generate", "chat"],
                    "model_specs": [
                        {"model_format": "pytorch", "model_size_in_billions": 1, "model_uri": "echo:"}
                    ],
                }
            )
        )
        run_env = {"NATSERVE_NATS_URL": nats_url, "NATSERVE_PREFIX": prefix}
        assert natserve("register", str(echo), tmp_path=tmp_path, **run_env).stdout == "registered LLM echo\n"
        launched = natserve("launch", "echo", "--model-uid", "e1", tmp_path=tmp_path, **run_env)
        assert launched.stdout == "e1\n", launched.stderr
        generated = natserve("generate", "e1", "one two three", "--stream", tmp_path=tmp_path, **run_env)
        assert generated.stdout.split() == ["one", "two", "three"], generated.stderr
        workers = natserve("--json", "workers", tmp_path=tmp_path, **run_env)
        [info] = json.loads(workers.stdout)
        assert info["worker_id"] == f"w-{unique}"
        assert [r["model_uid"] for r in info["replicas"]] == ["e1"]
        assert natserve("terminate", "e1", tmp_path=tmp_path, **run_env).returncode == 0
        for service in (worker, registry):
            service.proc.send_signal(signal.SIGTERM)
            assert service.proc.wait(timeout=30) == 0, "".join(service.stderr[-20:])
    finally:
        worker.kill()
        registry.kill()
