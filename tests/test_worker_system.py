"""The worker in the whole system: the real registry places launches on it, the client talks to it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from broker_client import AsyncClient, ModelEvent, NotFound
from tests.test_worker import llm_definition, within


@pytest.fixture
async def system(nats_url: str, sqlite_url: str, unique: str) -> AsyncIterator[AsyncClient]:
    from registry_service.app import run_registry
    from workers.app import run_worker

    prefix = f"s{unique}"
    stop = asyncio.Event()
    registry_ready, worker_ready = asyncio.Event(), asyncio.Event()
    tasks = [
        asyncio.create_task(
            run_registry(nats_url=nats_url, db_url=sqlite_url, prefix=prefix, stop=stop, ready=registry_ready)
        ),
        asyncio.create_task(
            run_worker(nats_url=nats_url, prefix=prefix, device="cpu", stop=stop, ready=worker_ready)
        ),
    ]
    client = AsyncClient(nats_url, prefix=prefix, timeout=120)
    try:
        await within(asyncio.gather(registry_ready.wait(), worker_ready.wait()), "registry and worker", 60)
        yield client
    finally:
        await client.close()
        stop.set()
        await within(asyncio.gather(*tasks), "registry and worker to stop", 60)


async def test_register_launch_generate_chat_terminate(system: AsyncClient, tiny_llama_dir: Path) -> None:
    client = system
    definition = llm_definition("nsql-tiny", f"file://{tiny_llama_dir}", context_length=512)
    await client.register_model(model_type="LLM", model=definition)
    events: list[ModelEvent] = []
    uid = await client.launch_model(model_name="nsql-tiny", progress=events.append)
    stages = [e.stage for e in events if e.replica_index == 0 and e.worker_id]
    assert "loading" in stages and stages[-1] == "ready"

    model: Any = await client.get_model(uid)
    out = await model.generate("SELECT", {"max_tokens": 4, "seed": 1})
    assert out["object"] == "text_completion" and 1 <= out["usage"]["completion_tokens"] <= 4
    chat = await model.chat([{"role": "user", "content": "hi"}], {"max_tokens": 4})
    assert chat["choices"][0]["message"]["role"] == "assistant"

    stream = await model.generate("hello", {"max_tokens": 6, "temperature": 0, "stream": True})
    chunks = [chunk async for chunk in stream]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 6

    (worker,) = await client.list_workers()
    (replica,) = worker["replicas"]
    assert replica["model_uid"] == uid and replica["status"] == "ready"
    assert replica["context_length"] == 512

    await client.terminate_model(uid)
    with pytest.raises(NotFound):
        await model.generate("SELECT", {"max_tokens": 2})
