"""The deployment files: compose.yaml, the Dockerfile and deploy/healthcheck.py.

No Docker engine is needed: compose.yaml is read with PyYAML and checked for what production
relies on (images and builds, ports, a health check on every service, start order on health,
the GPU reservation, the Hugging Face cache volume, the NATS passwords the server config
expects); the Dockerfile is checked as text; the health check script runs for real against a
nats-server with a Registry (exit 0) and against nothing (exit 1, quickly). Where the
``docker compose`` plugin exists, ``docker compose config`` validates the file as well.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from nats.micro import ServiceConfig, add_service

from broker_client.runtime import connect
from registry_service import Registry
from tests.support.nats_server import NatsServer
from tests.support.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
HEALTHCHECK = ROOT / "deploy" / "healthcheck.py"
NATS_CONFIG = ROOT / "deploy" / "nats-server.conf"
IMAGE_HEALTHCHECK = "/opt/natserve/healthcheck.py"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    # safe_load resolves the file's anchors and `<<` merge keys as compose does.
    doc = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(doc, dict)
    return doc


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return dict(compose["services"])


def command_text(service: dict[str, Any]) -> str:
    parts: list[str] = []
    for key in ("entrypoint", "command"):
        value = service.get(key)
        if value is not None:
            parts.extend(value if isinstance(value, list) else [value])
    return " ".join(str(p) for p in parts)


def health_test(service: dict[str, Any]) -> str:
    test = service["healthcheck"]["test"]
    return " ".join(test) if isinstance(test, list) else str(test)


def depends_on(service: dict[str, Any]) -> dict[str, str]:
    return {name: spec.get("condition", "") for name, spec in service["depends_on"].items()}


def test_services(services: dict[str, Any]) -> None:
    assert set(services) == {"nats", "postgres", "registry", "worker", "gateway"}


def test_every_service_has_a_health_check(services: dict[str, Any]) -> None:
    for name, service in services.items():
        check = service.get("healthcheck")
        assert check and check.get("test"), f"{name} has no healthcheck"
        assert check["test"][0] in ("CMD", "CMD-SHELL"), name
        for key in ("interval", "timeout", "retries"):
            assert key in check, f"{name}'s healthcheck has no {key}"


def test_nats(services: dict[str, Any]) -> None:
    nats = services["nats"]
    assert re.fullmatch(r"nats:2\.1\d(\.\d+)?-alpine", nats["image"])
    command = nats["command"]
    assert "-js" in command
    assert command[command.index("-m") + 1] == "8222"
    config_path = command[command.index("-c") + 1]
    assert f"./deploy/nats-server.conf:{config_path}:ro" in nats["volumes"]
    ports = [str(p) for p in nats["ports"]]
    assert any(p.endswith("4222:4222") for p in ports)
    assert any(p.endswith("8222:8222") for p in ports)
    assert "/healthz" in health_test(nats) and "8222" in health_test(nats)


def test_nats_gets_every_password_its_config_reads(services: dict[str, Any]) -> None:
    # Lines that are not comments: the admin user in the file is an example.
    wanted = set(re.findall(r"^\s*\{ user: \w+, password: \$(\w+)", NATS_CONFIG.read_text(), re.M))
    assert wanted == {"NATSERVE_CLIENT_PASSWORD", "NATSERVE_WORKER_PASSWORD", "NATSERVE_REGISTRY_PASSWORD"}
    environment = services["nats"]["environment"]
    for name in wanted:
        # Required (`:?`) rather than defaulted: no deployment with a known password.
        assert environment[name].startswith(f"${{{name}:?"), name


def test_postgres(services: dict[str, Any]) -> None:
    postgres = services["postgres"]
    assert postgres["image"] == "postgres:16"
    assert "pg_isready" in health_test(postgres)
    assert any(v.endswith(":/var/lib/postgresql/data") for v in postgres["volumes"])
    assert "ports" not in postgres  # only the registry talks to it


def test_registry(services: dict[str, Any]) -> None:
    registry = services["registry"]
    assert registry["build"]["context"] == "."
    text = command_text(registry)
    assert re.search(r"natserve db upgrade && exec natserve registry", text), text
    env = registry["environment"]
    assert env["NATSERVE_NATS_URL"] == "nats://nats:4222"
    assert env["NATSERVE_DB_URL"].startswith("postgresql+asyncpg://natserve:")
    assert env["NATSERVE_DB_URL"].endswith("@postgres:5432/natserve")
    assert env["NATSERVE_NATS_USER"] == "registry"
    assert depends_on(registry) == {"nats": "service_healthy", "postgres": "service_healthy"}
    assert health_test(registry) == f"CMD python {IMAGE_HEALTHCHECK} natserve-registry"


def test_worker(compose: dict[str, Any], services: dict[str, Any]) -> None:
    worker, registry = services["worker"], services["registry"]
    # The same image as the registry.
    assert worker["image"] == registry["image"]
    assert worker["build"] == registry["build"]
    assert worker["command"] == ["worker", "--device", "cuda:0"]
    assert worker["environment"]["NATSERVE_NATS_USER"] == "worker"
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    volume = next(v for v in worker["volumes"] if v.endswith(":/data/hf"))
    assert volume.split(":")[0] in compose["volumes"], "the HF cache must be a named volume"
    assert depends_on(worker) == {"nats": "service_healthy", "registry": "service_healthy"}
    assert health_test(worker) == f"CMD python {IMAGE_HEALTHCHECK} natserve-worker --this-host"


def test_gateway(services: dict[str, Any]) -> None:
    gateway = services["gateway"]
    assert command_text(gateway) == "gateway --host 0.0.0.0 --port 9997"
    env = gateway["environment"]
    assert env["NATSERVE_NATS_USER"] == "client"
    assert env["NATSERVE_NATS_PASSWORD"].startswith("${NATSERVE_CLIENT_PASSWORD:?")
    # Bound beyond the loopback: compose refuses to start it without API keys.
    assert env["NATSERVE_API_KEYS"].startswith("${NATSERVE_API_KEYS:?")
    assert "9997:9997" in gateway["ports"]
    assert depends_on(gateway) == {"nats": "service_healthy", "registry": "service_healthy"}
    assert "/healthz" in health_test(gateway)


def test_services_log_in_as_users_of_the_nats_config(services: dict[str, Any]) -> None:
    users = set(re.findall(r"^\s*\{ user: (\w+),", NATS_CONFIG.read_text(), re.M))
    for name in ("registry", "worker"):
        env = services[name]["environment"]
        assert env["NATSERVE_NATS_USER"] in users
        assert env["NATSERVE_NATS_PASSWORD"].startswith(f"${{NATSERVE_{name.upper()}_PASSWORD:?")


def test_dockerfile() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.M)
    assert re.search(r"^ARG TORCH_VARIANT=cpu$", text, re.M)
    assert "download.pytorch.org/whl/${TORCH_VARIANT}" in text
    # One image for every role: the extras are a build argument, every one of them by default.
    assert re.search(r"^ARG NATSERVE_EXTRAS=all$", text, re.M)
    assert re.search(r'^RUN pip install "\.\[\$\{NATSERVE_EXTRAS\}\]"$', text, re.M)
    assert re.search(r'^ENTRYPOINT \["natserve"\]$', text, re.M)
    assert re.search(rf"^COPY deploy/healthcheck\.py {re.escape(IMAGE_HEALTHCHECK)}$", text, re.M)
    assert re.search(r"^\s*HF_HOME=/data/hf\b", text, re.M)
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and users[-1] not in ("root", "0"), "the image must not run as root"
    # Every COPY source exists, so a build does not fail on a renamed folder.
    for line in re.findall(r"^COPY (?!--from)(.+)$", text, re.M):
        for source in line.split()[:-1]:
            assert (ROOT / source).exists(), f"COPY source {source} is missing"


@pytest.mark.skipif(shutil.which("docker") is None, reason="no docker CLI")
def test_docker_compose_config_accepts_the_file() -> None:
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip("the docker compose plugin is not installed")
    env = {
        **os.environ,
        **{
            k: "test"
            for k in (
                "NATSERVE_CLIENT_PASSWORD",
                "NATSERVE_WORKER_PASSWORD",
                "NATSERVE_REGISTRY_PASSWORD",
                "POSTGRES_PASSWORD",
            )
        },
    }
    result = subprocess.run(
        ["docker", "compose", "-f", str(COMPOSE), "config", "--quiet"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------- the health check script


def healthcheck(url: str, *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NATSERVE_")}
    env["NATSERVE_NATS_URL"] = url
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, str(HEALTHCHECK), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    return result, time.monotonic() - started


async def test_healthcheck_passes_against_a_running_registry(
    own_nats_server: NatsServer, sqlite_url: str
) -> None:
    async with Registry(nats_url=own_nats_server.url, db_url=sqlite_url):
        result, _ = await asyncio.to_thread(healthcheck, own_nats_server.url, "natserve-registry")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("healthy: natserve-registry")


async def test_healthcheck_fails_without_the_service(own_nats_server: NatsServer) -> None:
    result, took = await asyncio.to_thread(
        healthcheck, own_nats_server.url, "natserve-registry", "--timeout", "1"
    )
    assert result.returncode == 1
    assert "no natserve-registry instance answered" in result.stderr
    assert took < 10


def test_healthcheck_fails_fast_against_nothing() -> None:
    # A port nobody listens on: refused at once, no reconnect loop.
    result, took = healthcheck(f"nats://127.0.0.1:{free_port()}", "natserve-registry")
    assert result.returncode == 1
    assert "cannot reach NATS" in result.stderr
    assert took < 5


async def test_healthcheck_this_host_counts_only_this_machines_worker(own_nats_server: NatsServer) -> None:
    nc = await connect(own_nats_server.url, name="fake-workers")
    try:
        elsewhere = await add_service(
            nc, ServiceConfig(name="natserve-worker", version="0.0.0", metadata={"host": "elsewhere"})
        )
        await nc.flush()
        url = own_nats_server.url
        result, _ = await asyncio.to_thread(healthcheck, url, "natserve-worker", "--timeout", "1")
        assert result.returncode == 0, result.stderr  # any instance counts without --this-host
        result, _ = await asyncio.to_thread(
            healthcheck, url, "natserve-worker", "--this-host", "--timeout", "1"
        )
        assert result.returncode == 1
        this_host = {"host": socket.gethostname()}
        here = await add_service(
            nc, ServiceConfig(name="natserve-worker", version="0.0.0", metadata=this_host)
        )
        await nc.flush()
        result, _ = await asyncio.to_thread(healthcheck, url, "natserve-worker", "--this-host")
        assert result.returncode == 0, result.stderr
        await here.stop()
        await elsewhere.stop()
    finally:
        await nc.close()
