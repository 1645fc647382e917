"""Batch jobs from the outside: the ``natserve batch`` commands and OpenAI's own client on the
gateway's ``/v1/files`` and ``/v1/batches``, over a registry and a worker in this process.

The commands run as subprocesses (``asyncio.create_subprocess_exec``: the services share this
test's loop, which must keep running while a command waits for them)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import pytest

from natserve.gateway import run_gateway
from natserve.gateway.server import HttpListener, bind_listener
from tests.support.batches import ECHO_CHAT_TEMPLATE, chat_lines, jsonl, output_lines
from tests.support.cli import cli_env
from tests.support.pool import echo_definition
from tests.support.system import running_system
from tests.support.waits import eventually, within


@contextlib.asynccontextmanager
async def echo_pool(nats_url: str, db_url: str, prefix: str, uri: str = "echo:") -> AsyncIterator[str]:
    async with running_system(nats_url, db_url, prefix) as client:
        name = f"echo-{prefix}"
        await client.register_model("LLM", echo_definition(name, uri, chat_template=ECHO_CHAT_TEMPLATE))
        yield await client.launch_model(model_name=name, progress=False)


async def run_cli(tmp_path: Path, nats_url: str, prefix: str, *args: str) -> tuple[int, str, str]:
    env = cli_env(tmp_path, NATSERVE_NATS_URL=nats_url, NATSERVE_PREFIX=prefix)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "natserve",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await within(proc.communicate(), f"natserve {' '.join(args)}", 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_the_batch_commands(tmp_path: Path, nats_url: str, sqlite_url: str, unique: str) -> None:
    prefix = f"k{unique}"
    async with echo_pool(nats_url, sqlite_url, prefix) as uid:
        jobs = tmp_path / "jobs.jsonl"
        jobs.write_bytes(jsonl(chat_lines(12)))
        code, out, err = await run_cli(
            tmp_path, nats_url, prefix, "batch", "submit", str(jobs), "--model", uid, "--wait"
        )
        assert code == 0, err
        batch_id, status = out.split()[:2]
        assert status == "completed" and "12 completed, 0 failed of 12" in out

        code, out, err = await run_cli(tmp_path, nats_url, prefix, "batch", "status", batch_id, "--json")
        assert code == 0, err
        assert json.loads(out)["request_counts"] == {"total": 12, "completed": 12, "failed": 0}

        result = tmp_path / "out.jsonl"
        code, out, err = await run_cli(
            tmp_path, nats_url, prefix, "batch", "results", batch_id, "-o", str(result)
        )
        assert code == 0, err
        ids = sorted(line["custom_id"] for line in output_lines(result.read_bytes()))
        assert ids == sorted(f"r{i}" for i in range(12))
        code, out, err = await run_cli(tmp_path, nats_url, prefix, "batch", "results", batch_id)
        assert code == 0 and len(output_lines(out.encode())) == 12

        code, out, err = await run_cli(tmp_path, nats_url, prefix, "batch", "results", batch_id, "--errors")
        assert code == 1 and err.strip() == f"error: batch {batch_id} (completed) has no error file"

        # Without --wait: the id at once; then cancel it.
        jobs.write_bytes(jsonl(chat_lines(3, uid)))
        code, out, err = await run_cli(tmp_path, nats_url, prefix, "batch", "submit", str(jobs))
        assert code == 0, err
        second = out.strip()
        assert second.startswith("batch_") and second != batch_id
        code, out, err = await run_cli(tmp_path, nats_url, prefix, "batch", "cancel", second)
        assert code == 0, err
        assert out.startswith(second)

        code, out, err = await run_cli(tmp_path, nats_url, prefix, "batch", "list")
        assert code == 0, err
        assert batch_id in out and second in out

        # A bad line: one error line naming it, no traceback.
        jobs.write_text('{"custom_id": "x", "url": "/v1/nope", "body": {}}\n')
        code, out, err = await run_cli(
            tmp_path, nats_url, prefix, "batch", "submit", str(jobs), "--model", uid
        )
        assert code == 1
        assert err.strip().startswith("error: line 1: url: '/v1/nope'") and "Traceback" not in err


@pytest.fixture
async def gateway(nats_url: str, sqlite_url: str, unique: str) -> AsyncIterator[tuple[str, str]]:
    prefix = f"g{unique}"
    async with echo_pool(nats_url, sqlite_url, prefix) as uid:
        listener = HttpListener(bind_listener("127.0.0.1", 0))
        stop, ready = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(
            run_gateway(nats_url=nats_url, listener=listener, stop=stop, ready=ready, prefix=prefix)
        )
        try:
            await within(ready.wait(), "the gateway to serve")
            yield f"http://127.0.0.1:{listener.port}/v1", uid
        finally:
            stop.set()
            await within(task, "the gateway to stop")


async def test_openais_client_runs_a_batch_through_the_gateway(gateway: tuple[str, str]) -> None:
    base_url, uid = gateway
    client = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0)
    try:
        uploaded = await client.files.create(file=("jobs.jsonl", jsonl(chat_lines(6, uid))), purpose="batch")
        assert uploaded.id.startswith("file-") and uploaded.purpose == "batch"
        assert uploaded.filename == "jobs.jsonl"
        batch = await client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        assert batch.status == "in_progress" and batch.request_counts is not None
        assert batch.request_counts.total == 6

        async def completed() -> Any:
            got = await client.batches.retrieve(batch.id)
            return got if got.status == "completed" else None

        done = await eventually(completed, "the batch to complete", interval=0.2)
        assert done.output_file_id is not None and done.request_counts.completed == 6
        content = await client.files.content(done.output_file_id)
        lines = output_lines(content.content)
        assert sorted(line["custom_id"] for line in lines) == sorted(f"r{i}" for i in range(6))
        assert (await client.files.retrieve(done.output_file_id)).bytes == len(content.content)

        page = await client.batches.list(limit=10)
        assert [b.id for b in page.data] == [batch.id]
        cancelled = await client.batches.cancel(batch.id)
        assert cancelled.status == "completed"  # finished already: nothing to cancel

        with pytest.raises(openai.BadRequestError) as caught:
            await client.files.create(file=("x.jsonl", b"{}"), purpose="fine-tune")
        assert "purpose 'fine-tune'" in str(caught.value)
        with pytest.raises(openai.NotFoundError):
            await client.batches.retrieve("batch_000000000000000000000000")
        bad = await client.files.create(
            file=("bad.jsonl", b'{"custom_id": "a", "url": "/v1/x", "body": {}}\n'), purpose="batch"
        )
        with pytest.raises(openai.BadRequestError) as caught:
            await client.batches.create(
                input_file_id=bad.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
        assert "line 1: url: '/v1/x'" in str(caught.value)
    finally:
        await client.close()
