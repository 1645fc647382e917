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
from tests.support.waits import within
from tests.support.worker import llm_definition


@pytest.fixture
async def system(nats_url: str, sqlite_url: str, unique: str) -> AsyncIterator[AsyncClient]:
    from registry_service.app import run_registry
    from workers import WorkerSettings
    from workers.app import run_worker

    prefix = f"s{unique}"
    stop = asyncio.Event()
    registry_ready, worker_ready = asyncio.Event(), asyncio.Event()
    tasks = [
        asyncio.create_task(
            run_registry(nats_url=nats_url, db_url=sqlite_url, prefix=prefix, stop=stop, ready=registry_ready)
        ),
        asyncio.create_task(
            run_worker(WorkerSettings(nats_url, prefix=prefix, device="cpu"), stop=stop, ready=worker_ready)
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


def _run_probe(script: str, *args: str) -> dict[str, Any]:
    """Run ``script`` in a fresh interpreter from the repository root (at most 120 s); the JSON
    object its last line prints."""
    result = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert result.returncode == 0, result.stderr
    seen: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return seen


_WARM_UP_PROBE = """
import asyncio, json, sys
from workers import Worker, WorkerSettings

async def main():
    warmed = []
    after = asyncio.Event() if sys.argv[4] == "1" else None
    worker = Worker(
        WorkerSettings(sys.argv[1], prefix=sys.argv[2], device="cpu", warm_up=sys.argv[3] == "1"),
        # Whole by then: its last class defined, not only entered in sys.modules.
        on_warm=lambda: warmed.append(hasattr(sys.modules["transformers.modeling_utils"], "PreTrainedModel")),
        warm_up_after=after,
    )
    await worker.start()
    try:
        held = None
        if after is not None:
            await asyncio.sleep(0)  # one turn: the warm-up task runs to its first wait
            waiting_on = worker._warming.get_coro().cr_await
            held = "torch" not in sys.modules and waiting_on.__qualname__ == "Event.wait"
            after.set()
        if worker.settings.warm_up:
            await asyncio.wait_for(asyncio.shield(worker._warming), 60)
        imported = "transformers.modeling_utils" in sys.modules
        print(json.dumps({"warmed": warmed, "imported": imported, "held": held}))
    finally:
        await worker.stop()

asyncio.run(main())
"""


@pytest.mark.parametrize(("warm_up", "after"), [(True, False), (True, True), (False, False)])
def test_a_warming_worker_imports_the_model_loading_code_in_the_background(
    nats_url: str, unique: str, warm_up: bool, after: bool
) -> None:
    """In a fresh interpreter: with warm_up the loader's heavy imports run on a thread that
    start() does not wait for, and on_warm follows them; with warm_up_after, only once that
    event is set; without warm_up, they wait for a launch."""
    seen = _run_probe(_WARM_UP_PROBE, nats_url, f"w{unique}", "1" if warm_up else "0", "1" if after else "0")
    held = True if after else None
    assert seen == (
        {"warmed": [True], "imported": True, "held": held}
        if warm_up
        else {"warmed": [], "imported": False, "held": None}
    )


_NO_TORCH_PROBE = """
import asyncio, json, sys
from broker_client import AsyncClient
from registry_service.app import run_registry
from tests.support.worker import llm_definition
from workers import WorkerSettings
from workers.app import run_worker

async def main():
    url, db_url, prefix, tiny = sys.argv[1:5]
    warmed = []
    stop = asyncio.Event()
    ready = [asyncio.Event(), asyncio.Event()]
    tasks = [
        asyncio.create_task(
            run_registry(nats_url=url, prefix=prefix, stop=stop, db_url=db_url, ready=ready[0])
        ),
        asyncio.create_task(
            run_worker(
                WorkerSettings(url, prefix=prefix, warm_up=False),
                stop=stop,
                ready=ready[1],
                on_warm=lambda: warmed.append(len(warmed)),
            )
        ),
    ]
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in ready)), 60)
    seen = {"at_ready": "torch" in sys.modules}
    async with AsyncClient(url, prefix=prefix, timeout=60) as client:
        await client.register_model(model_type="LLM", model=llm_definition("probe-echo", "echo:"))
        model = await client.get_model(await client.launch_model(model_name="probe-echo", progress=False))
        out = await model.generate("one two three", {"max_tokens": 2})
        (worker,) = await client.list_workers()
        seen["answered"] = out["usage"]["completion_tokens"] == 2 and bool(worker["devices"])
        seen["after_echo"] = "torch" in sys.modules
        # The first real launch does the imports, and on_warm follows them once.
        for name in ("probe-tiny", "probe-tiny-2"):
            await client.register_model(model_type="LLM", model=llm_definition(name, tiny))
            await client.launch_model(model_name=name, progress=False)
        seen["warmed"] = warmed
    stop.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 60)
    print(json.dumps(seen))

asyncio.run(main())
"""


def test_a_pool_answers_before_torch_is_imported(
    nats_url: str, unique: str, tmp_path: Path, tiny_llama_dir: Path
) -> None:
    """In a fresh interpreter, registry and worker as natserve up runs them (warm-up off): they
    start, register, launch and serve the echo model without importing torch, which only model
    loads need (the warm-up imports it on a thread). Where a GPU driver is present the worker
    imports torch to ask it about its devices. The first model launch then does the imports,
    and on_warm runs after them, once."""
    from workers.devices import gpu_driver_possible

    db_url = f"sqlite+aiosqlite:///{tmp_path / 'registry.db'}"
    seen = _run_probe(_NO_TORCH_PROBE, nats_url, db_url, f"t{unique}", f"file://{tiny_llama_dir}")
    assert seen["answered"] is True and seen["warmed"] == [0]
    if not gpu_driver_possible():
        assert (seen["at_ready"], seen["after_echo"]) == (False, False)


def test_warm_up_runs_once_per_process() -> None:
    from workers.loading import warm_up

    warm_up()
    assert "transformers.modeling_utils" in sys.modules
    assert warm_up() == 0.0
