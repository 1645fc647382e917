"""``natserve status``: a real registry and worker in this process, the CLI's main() in a thread."""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from broker_client import AsyncClient, NotFound
from natserve import status as status_module
from natserve.cli import main
from natserve.status import render_status, watch_status
from tests.test_worker import llm_definition, within

TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"


@pytest.fixture
async def pool(nats_url: str, sqlite_url: str, unique: str) -> AsyncIterator[tuple[AsyncClient, str]]:
    from registry_service.app import run_registry
    from workers import WorkerSettings
    from workers.app import run_worker

    prefix = f"stat{unique}"
    stop = asyncio.Event()
    ready = [asyncio.Event(), asyncio.Event()]
    tasks = [
        asyncio.create_task(
            run_registry(nats_url=nats_url, db_url=sqlite_url, prefix=prefix, stop=stop, ready=ready[0])
        ),
        asyncio.create_task(
            run_worker(
                WorkerSettings(
                    nats_url, prefix=prefix, device="cpu", worker_id=f"statw-{unique}", heartbeat_interval=0.2
                ),
                stop=stop,
                ready=ready[1],
            )
        ),
    ]
    client = AsyncClient(nats_url, prefix=prefix, timeout=60)
    try:
        await within(asyncio.gather(*(e.wait() for e in ready)), "registry and worker", 60)
        yield client, prefix
    finally:
        await client.close()
        stop.set()
        await within(asyncio.gather(*tasks), "registry and worker to stop", 60)


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


def test_render_status_of_a_dead_worker_and_an_empty_pool() -> None:
    now = time.time()
    data = {
        "ts": now,
        "workers": [
            {
                "worker_id": "w1",
                "host": "h1",
                "alive": False,
                "status": "running",
                "last_seen": now - 42,
                "devices": [
                    {
                        "name": "cuda:0",
                        "total_memory": 80 * 2**30,
                        "free_memory": 20 * 2**30,
                        "description": "H100",
                    }
                ],
                "replicas": [
                    {
                        "model_uid": "m",
                        "replica_index": 1,
                        "status": "loading",
                        "device": "cuda:0",
                        "active": 3,
                        "waiting": 7,
                        "request_limits": 16,
                        "requests": 9,
                        "errors": 2,
                        "memory_bytes": 2**30,
                    }
                ],
            }
        ],
        "models": {
            "m": {
                "model_name": "mm",
                "model_type": "LLM",
                "status": "launching",
                "replicas": [{"status": "loading"}, {"status": "ready"}],
            }
        },
        "recent_errors": [
            {
                "ts": now,
                "source": "w1",
                "model_uid": "m",
                "endpoint": "generate",
                "code": 500,
                "message": "internal error on 'x': boom",
            }
        ],
    }
    console = Console(file=io.StringIO(), width=250)
    console.print(render_status(data))
    out = console.file.getvalue()  # type: ignore[attr-defined]
    for text in (
        "0 of 1 worker(s) alive",
        "no",
        "42.",
        "80.0 GiB",
        "20.0 GiB",
        "75%",
        "H100",
        "loading",
        "16",
        "1.0 GiB",
        "1/2",
        "boom",
        "500",
    ):
        assert text in out, f"{text!r} not in:\n{out}"

    console = Console(file=io.StringIO(), width=120)
    console.print(render_status({"ts": now, "workers": [], "models": {}, "recent_errors": []}))
    out = console.file.getvalue()  # type: ignore[attr-defined]
    assert "0 of 0 worker(s) alive" in out and "Workers: none" in out and "Recent errors: none" in out


def test_watch_refreshes_until_ctrl_c(monkeypatch: pytest.MonkeyPatch) -> None:
    from broker_client import NoResponders

    calls = []

    def fake_collect(client: Any) -> dict[str, Any]:
        calls.append(time.monotonic())
        if len(calls) == 2:
            raise NoResponders("no natserve registry answers")
        if len(calls) == 4:
            raise KeyboardInterrupt
        return {"ts": time.time(), "workers": [], "models": {}, "recent_errors": []}

    monkeypatch.setattr(status_module, "collect_status", fake_collect)
    console = Console(file=io.StringIO(), width=120, force_terminal=True)
    watch_status(object(), interval=0.01, console=console)  # returns on Ctrl-C
    out = console.file.getvalue()  # type: ignore[attr-defined]
    assert len(calls) == 4
    assert "cannot get the status: no natserve registry answers" in out
    assert "worker(s) alive" in out


def test_status_rejects_a_bad_interval(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--watch", "--interval", "0"]) == 2
    assert "--interval must be positive" in capsys.readouterr().err
