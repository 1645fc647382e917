"""A batch job through faults, with real processes: ``natserve registry`` and two ``natserve
worker``s on a nats-server with a JetStream file store, serving the tiny Llama.

A 1,000-request job runs while one worker is SIGKILLed (about 30% done), the registry is
SIGKILLed and started again (about 45%) and the nats-server is restarted on its port and store
(about 60%). Every custom_id must be in the output exactly once.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from broker_client import AsyncBatchClient, AsyncClient
from tests.support.batches import finished, output_lines, progressed
from tests.support.nats_server import NatsServer
from tests.support.pool import Pool
from tests.support.waits import eventually_despite_errors

pytestmark = pytest.mark.slow

JOB = 1000


def tiny_definition(name: str, model_dir: Path) -> dict[str, Any]:
    return {
        "version": 1,
        "model_name": name,
        "model_lang": ["en"],
        "model_ability": ["generate", "chat"],
        "context_length": 256,
        "model_specs": [
            {
                "model_format": "pytorch",
                "model_size_in_billions": 0.01,
                "quantizations": ["none"],
                "model_uri": f"file://{model_dir}",
            }
        ],
    }


def completion_lines(n: int, uid: str) -> list[dict[str, Any]]:
    return [
        {
            "custom_id": f"c{i}",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"model": uid, "prompt": f"SELECT {i} FROM t", "max_tokens": 6, "temperature": 0},
        }
        for i in range(n)
    ]


async def test_every_request_is_answered_once_through_a_worker_kill_and_registry_and_nats_restarts(
    tmp_path: Path, own_nats_server: NatsServer, unique: str, tiny_llama_dir: Path
) -> None:
    server = own_nats_server
    pool = Pool(tmp_path, server.url, f"j{unique}")
    env = {
        "NATSERVE_MODEL_ROOTS": str(tiny_llama_dir.parent),
        "HF_HUB_OFFLINE": "1",
        "NATSERVE_BATCH_SLOTS": "8",
    }
    try:
        registry = pool.registry()
        a, b = pool.worker(f"wa-{unique}", **env), pool.worker(f"wb-{unique}", **env)
        await asyncio.gather(registry.wait_ready(), a.wait_ready(), b.wait_ready())
        async with AsyncClient(pool.nats_url, prefix=pool.prefix, timeout=60) as client:

            async def both_alive() -> bool:
                alive = {w["worker_id"] for w in await client.list_workers() if w["alive"]}
                return {a.name, b.name} <= alive

            await eventually_despite_errors(both_alive, "both workers in the registry")
            await client.register_model("LLM", tiny_definition("tiny", tiny_llama_dir), persist=True)
            uid = await client.launch_model("tiny", replica=2, progress=False)
            described = await client.describe_model(uid)
            assert {r["worker_id"] for r in described["replicas"]} == {a.name, b.name}

        batches = await AsyncBatchClient.connect(pool.nats_url, prefix=pool.prefix, timeout=5)
        try:
            job = await batches.create(requests=completion_lines(JOB, uid), endpoint="/v1/completions")
            batch_id = job["id"]

            await progressed(batches, batch_id, JOB * 30 // 100)
            a.signal(signal.SIGKILL)
            await progressed(batches, batch_id, JOB * 45 // 100)
            registry.signal(signal.SIGKILL)
            await registry.wait(10)
            registry = pool.registry("registry-2")
            await registry.wait_ready()
            await progressed(batches, batch_id, JOB * 60 // 100)
            server.restart()
            restarted = time.time()
            done = await finished(batches, batch_id, timeout=90)
            output = await batches.download(done["output_file_id"]) if done["output_file_id"] else b""
        finally:
            await batches.close()
        assert done["status"] == "completed", (done, pool.logs())
        # The faults came while the job ran, not after it.
        assert done["completed_at"] >= int(restarted), done
        assert done["request_counts"] == {"total": JOB, "completed": JOB, "failed": 0}, done
        lines = output_lines(output)
        ids = [line["custom_id"] for line in lines]
        assert len(ids) == JOB and set(ids) == {f"c{i}" for i in range(JOB)}, (len(ids), len(set(ids)))
        assert all(line["response"]["status_code"] == 200 for line in lines)
        assert all(line["response"]["body"]["object"] == "text_completion" for line in lines)
    finally:
        pool.close()
