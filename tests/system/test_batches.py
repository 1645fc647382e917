"""Batch jobs through a registry and a worker in this process, on a real nats-server with
JetStream: create, get, list, cancel, validation errors, object-store input, the output file."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from broker_client import AsyncBatchClient, AsyncClient
from tests.support.batches import ECHO_CHAT_TEMPLATE, chat_lines, finished, output_lines
from tests.support.pool import echo_definition
from tests.support.system import running_system


@pytest.fixture
async def pool_with_echo(
    nats_url: str, sqlite_url: str, unique: str
) -> AsyncIterator[tuple[AsyncClient, AsyncBatchClient, str]]:
    prefix = f"b{unique}"
    async with running_system(nats_url, sqlite_url, prefix) as client:
        name = f"echo-{unique}"
        await client.register_model("LLM", echo_definition(name, chat_template=ECHO_CHAT_TEMPLATE))
        uid = await client.launch_model(model_name=name, progress=False)
        batches = await AsyncBatchClient.connect(nats_url, prefix=prefix)
        try:
            yield client, batches, uid
        finally:
            await batches.close()


async def test_an_inline_job_is_answered_once_per_custom_id(pool_with_echo: Any) -> None:
    _, batches, uid = pool_with_echo
    job = await batches.create(requests=chat_lines(20, uid), endpoint="/v1/chat/completions")
    assert job["object"] == "batch" and job["status"] == "in_progress"
    assert job["request_counts"] == {"total": 20, "completed": 0, "failed": 0}
    done = await finished(batches, job["id"])
    assert done["status"] == "completed", done
    assert done["request_counts"] == {"total": 20, "completed": 20, "failed": 0}
    lines = output_lines(await batches.download(done["output_file_id"]))
    assert sorted(line["custom_id"] for line in lines) == sorted(f"r{i}" for i in range(20))
    first = next(line for line in lines if line["custom_id"] == "r3")
    assert first["response"]["status_code"] == 200
    assert first["response"]["body"]["object"] == "chat.completion"
    assert "w3" in first["response"]["body"]["choices"][0]["message"]["content"]
    assert done["error_file_id"] is None
