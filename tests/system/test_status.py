"""``natserve status``: a real registry and worker in this process, the CLI's main() in a thread.
Rendering and watching alone are tests/unit/test_status.py."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from broker_client import AsyncClient, NotFound
from broker_client.runtime import NatsTransport
from natserve.cli import main
from tests.support.system import running_system
from tests.support.waits import within
from tests.support.worker import llm_definition

TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"


@pytest.fixture
async def pool(nats_url: str, sqlite_url: str, unique: str) -> AsyncIterator[tuple[AsyncClient, str]]:
    prefix = f"stat{unique}"
    async with running_system(
        nats_url, sqlite_url, prefix, client_timeout=60, worker_id=f"statw-{unique}", heartbeat_interval=0.2
    ) as client:
        yield client, prefix


async def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    # The sync Client refuses to run inside an event loop: main() runs in a thread of its own.
    code = await asyncio.to_thread(main, list(argv))
    out, err = capsys.readouterr()
    assert code == 0, err
    return code, out


async def _until_heartbeat_shows(client: AsyncClient, what: str, check: Any) -> dict[str, Any]:
    """workers.list until ``check(reply)``; each retry waits for the next heartbeat, so the wait
    is event-driven, and bounded by ``within``."""
    transport = await client._get_transport()
    assert isinstance(transport, NatsTransport)
    beats: asyncio.Queue[Any] = asyncio.Queue()
    sub = await transport.nc.subscribe(client.subjects.workers_heartbeats, cb=beats.put)
    try:

        async def poll() -> dict[str, Any]:
            while True:
                reply = await client._request(client.subjects.workers_list, {})
                if check(reply):
                    return dict(reply)
                await beats.get()

        return await within(poll(), what, 30)
    finally:
        await sub.unsubscribe()


async def test_status_json_and_tables_through_the_cli(
    pool: tuple[AsyncClient, str],
    nats_url: str,
    unique: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client, prefix = pool
    await client.register_model(model_type="LLM", model=llm_definition("st", "echo:", chat_template=TEMPLATE))
    uid = await client.launch_model(model_name="st", model_uid=f"st-{unique}", progress=False)
    model: Any = await client.get_model(model_uid=uid)
    await model.generate("a b c")
    await client.register_model(model_type="LLM", model=llm_definition("gone", f"file://{tmp_path}/none"))
    with pytest.raises(NotFound):
        await client.launch_model(model_name="gone", model_uid=f"gone-{unique}", progress=False)
    worker_id = f"statw-{unique}"
    await _until_heartbeat_shows(
        client,
        "a heartbeat with the request counted and the failed launch",
        lambda r: any(
            w["worker_id"] == worker_id
            and w.get("recent_errors")
            and any(x.get("requests") == 1 for x in w["replicas"])
            for w in r["workers"]
        ),
    )

    base = ["--nats-url", nats_url, "--prefix", prefix]
    _, out = await _cli(capsys, "status", "--json", *base)
    data = json.loads(out)
    assert set(data) == {"ts", "workers", "models", "recent_errors"}
    [worker] = data["workers"]
    assert worker["worker_id"] == worker_id and worker["alive"] is True
    assert [d["name"] for d in worker["devices"]][-1] == "cpu"
    [replica] = worker["replicas"]
    assert replica["model_uid"] == uid and replica["status"] == "ready" and replica["requests"] == 1
    assert set(data["models"]) == {uid}
    sources = {(e["source"], e["model_uid"]) for e in data["recent_errors"]}
    assert sources == {(worker_id, f"gone-{unique}"), ("registry", f"gone-{unique}")}
    assert all("does not exist" in e["message"] for e in data["recent_errors"])

    monkeypatch.setenv("COLUMNS", "250")  # rich wraps at 80 columns when not on a terminal
    _, out = await _cli(capsys, "status", *base)
    for text in (
        "Workers",
        "Devices",
        "Replicas",
        "Models",
        "Recent errors",
        worker_id,
        uid,
        "ready",
        "cpu",
        f"gone-{unique}",
        "does not exist",
        "1 of 1 worker(s) alive",
    ):
        assert text in out, f"{text!r} not in:\n{out}"
    assert "Traceback" not in out
