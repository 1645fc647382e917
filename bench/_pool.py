"""The registry and one worker in one process, as ``natserve up`` runs them: the benchmarks'
natserve side, run in a spawned process while the client measures in the benchmark's own."""

from __future__ import annotations

import asyncio
import json
from typing import Any


def llm_definition(name: str, model_uri: str, size_in_billions: float = 0.001) -> str:
    """The JSON of a custom LLM definition serving ``model_uri`` under ``name`` (generate only)."""
    return json.dumps(
        {
            "version": 1,
            "model_name": name,
            "model_lang": ["en"],
            "model_ability": ["generate"],
            "context_length": 4096,
            "model_specs": [
                {
                    "model_format": "pytorch",
                    "model_size_in_billions": size_in_billions,
                    "quantizations": ["none"],
                    "model_uri": model_uri,
                }
            ],
        }
    )


def run_pool(
    url: str,
    home: str,
    ready: Any,
    stop: Any,
    *,
    device: str = "cpu",
    heartbeat_interval: float = 2.0,
    steady: bool = False,
    batch_slots: int | None = None,
) -> None:
    """Serve until ``stop`` (a multiprocessing Event) is set; set ``ready`` once both answer
    (``steady``: and the worker's warm-up is over, so that nothing of the start-up runs any
    more while the benchmark measures).

    Raises when a service dies at start or both are not ready within 120 s.
    """
    import threading

    from natserve.embedded import freeze_heap
    from registry_service.app import run_registry
    from workers import WorkerSettings
    from workers.app import run_worker

    warm = threading.Event()

    def on_warm() -> None:
        freeze_heap()  # as natserve up does
        warm.set()

    async def main() -> None:
        stop_ev = asyncio.Event()
        reg_ready, wrk_ready, all_ready = asyncio.Event(), asyncio.Event(), asyncio.Event()
        tasks = [
            asyncio.create_task(
                run_registry(
                    nats_url=url, db_url=f"sqlite+aiosqlite:///{home}/r.db", stop=stop_ev, ready=reg_ready
                )
            ),
            asyncio.create_task(
                run_worker(
                    WorkerSettings(
                        url,
                        device=device,
                        heartbeat_interval=heartbeat_interval,
                        warm_up=True,
                        **({} if batch_slots is None else {"batch_slots": batch_slots}),
                    ),
                    stop=stop_ev,
                    ready=wrk_ready,
                    # As natserve up does: the warm-up once both answer.
                    on_warm=on_warm,
                    warm_up_after=all_ready,
                )
            ),
        ]
        waiter: asyncio.Future[Any] = asyncio.ensure_future(
            asyncio.gather(reg_ready.wait(), wrk_ready.wait())
        )
        done, _ = await asyncio.wait([waiter, *tasks], timeout=120, return_when=asyncio.FIRST_COMPLETED)
        if waiter not in done:  # a service died (its exception surfaces here) or timed out
            for t in done:
                t.result()
            raise RuntimeError("registry and worker were not ready within 120 s")
        freeze_heap()  # as natserve up does once its services are ready
        all_ready.set()
        if steady and not await asyncio.to_thread(warm.wait, 120):
            raise RuntimeError("the worker's warm-up did not end within 120 s")
        ready.set()
        await asyncio.get_running_loop().run_in_executor(None, stop.wait)
        stop_ev.set()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(main())
