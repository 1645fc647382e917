"""The worker in the whole system: the real registry places launches on it, the client talks to it."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
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


_WARM_UP_PROBE = """
import asyncio, json, sys
from workers import Worker

async def main():
    warmed = []
    worker = Worker(
        sys.argv[1],
        prefix=sys.argv[2],
        device="cpu",
        warm_up=sys.argv[3] == "1",
        # Whole by then: its last class defined, not only entered in sys.modules.
        on_warm=lambda: warmed.append(hasattr(sys.modules["transformers.modeling_utils"], "PreTrainedModel")),
    )
    await worker.start()
    try:
        if worker.warm_up:
            await asyncio.wait_for(asyncio.shield(worker._warming), 60)
        print(json.dumps({"warmed": warmed, "imported": "transformers.modeling_utils" in sys.modules}))
    finally:
        await worker.stop()

asyncio.run(main())
"""


@pytest.mark.parametrize("warm_up", [True, False])
def test_a_warming_worker_imports_the_model_loading_code_in_the_background(
    nats_url: str, unique: str, warm_up: bool
) -> None:
    """In a fresh interpreter: with warm_up the loader's heavy imports run on a thread that
    start() does not wait for, and on_warm follows them; without, they wait for a launch."""
    result = subprocess.run(
        [sys.executable, "-c", _WARM_UP_PROBE, nats_url, f"w{unique}", "1" if warm_up else "0"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen == {"warmed": [True], "imported": True} if warm_up else {"warmed": [], "imported": False}


def test_warm_up_runs_once_per_process() -> None:
    from workers.loader import warm_up

    warm_up()
    assert "transformers.modeling_utils" in sys.modules
    assert warm_up() == 0.0
