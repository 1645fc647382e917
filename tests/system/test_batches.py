"""Batch jobs through a registry and a worker in this process, on a real nats-server with
JetStream: create, get, list, cancel, validation errors, object-store input, the output and
error files, and the submit-time errors (no JetStream, a full stream)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from broker_client import (
    AsyncBatchClient,
    AsyncClient,
    BadRequest,
    BatchNames,
    NotFound,
    Overloaded,
    Unavailable,
)
from broker_client.runtime import connect
from registry_service import BatchLimits, Registry
from tests.support.batches import ECHO_CHAT_TEMPLATE, chat_lines, finished, jsonl, output_lines
from tests.support.nats_server import running_nats_server
from tests.support.pool import echo_definition
from tests.support.system import running_registry_and_workers, running_system
from tests.support.waits import eventually


@dataclass
class Batching:
    client: AsyncClient
    batches: AsyncBatchClient
    uid: str
    prefix: str


@contextlib.asynccontextmanager
async def batching(nats_url: str, db_url: str, prefix: str, uri: str = "echo:") -> AsyncIterator[Batching]:
    """A registry and a worker serving one echo model (``uri``), and a batch client."""
    async with running_system(nats_url, db_url, prefix) as client:
        name = f"echo-{prefix}"
        await client.register_model("LLM", echo_definition(name, uri, chat_template=ECHO_CHAT_TEMPLATE))
        uid = await client.launch_model(model_name=name, progress=False)
        batches = await AsyncBatchClient.connect(nats_url, prefix=prefix, timeout=30)
        try:
            yield Batching(client, batches, uid, prefix)
        finally:
            await batches.close()


@pytest.fixture
async def pool(nats_url: str, sqlite_url: str, unique: str) -> AsyncIterator[Batching]:
    async with batching(nats_url, sqlite_url, f"b{unique}") as p:
        yield p


async def test_an_inline_job_is_answered_once_per_custom_id(pool: Batching) -> None:
    job = await pool.batches.create(requests=chat_lines(20, pool.uid), endpoint="/v1/chat/completions")
    assert job["object"] == "batch" and job["status"] == "in_progress"
    assert job["endpoint"] == "/v1/chat/completions" and job["completion_window"] == "24h"
    assert job["request_counts"] == {"total": 20, "completed": 0, "failed": 0}
    assert job["expires_at"] - job["created_at"] == 24 * 3600
    done = await finished(pool.batches, job["id"])
    assert done["status"] == "completed", done
    assert done["request_counts"] == {"total": 20, "completed": 20, "failed": 0}
    assert done["completed_at"] >= done["in_progress_at"] >= done["created_at"]
    lines = output_lines(await pool.batches.download(done["output_file_id"]))
    assert sorted(line["custom_id"] for line in lines) == sorted(f"r{i}" for i in range(20))
    third = next(line for line in lines if line["custom_id"] == "r3")
    assert third["error"] is None and third["response"]["status_code"] == 200
    assert third["response"]["body"]["object"] == "chat.completion"
    assert "w3" in third["response"]["body"]["choices"][0]["message"]["content"]
    assert done["error_file_id"] is None
    # The input is kept as a file too.
    assert output_lines(await pool.batches.download(done["input_file_id"])) == chat_lines(20, pool.uid)


async def test_an_input_file_in_the_object_store_with_mixed_endpoints_and_failures(pool: Batching) -> None:
    lines = [
        *chat_lines(3),
        {"custom_id": "g", "url": "/v1/completions", "body": {"prompt": "a b c", "max_tokens": 2}},
        # An LLM cannot embed: the worker's 400 becomes the line's error.
        {"custom_id": "e", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}},
    ]
    file_id = await pool.batches.upload(jsonl(lines), filename="mixed.jsonl")
    described = await pool.batches.file(file_id)
    assert described["filename"] == "mixed.jsonl" and described["purpose"] == "batch"
    assert described["bytes"] == len(jsonl(lines)) and described["object"] == "file"
    job = await pool.batches.create(input_file_id=file_id, model=pool.uid)
    done = await finished(pool.batches, job["id"])
    assert done["status"] == "completed"
    assert done["request_counts"] == {"total": 5, "completed": 4, "failed": 1}
    out = {
        line["custom_id"]: line for line in output_lines(await pool.batches.download(done["output_file_id"]))
    }
    assert set(out) == {"r0", "r1", "r2", "g", "e"}
    assert out["g"]["response"]["body"]["choices"][0]["text"].split() == ["a", "b"]
    errors = output_lines(await pool.batches.download(done["error_file_id"]))
    assert [line["custom_id"] for line in errors] == ["e"]
    assert errors[0]["response"]["status_code"] == 400
    assert "embed" in errors[0]["error"]["message"]


BAD_LINES: list[tuple[Any, str]] = [
    ([{"custom_id": "a", "url": "/v1/chat", "body": {}}], "line 1: url: '/v1/chat' is not one of"),
    (
        [*chat_lines(2), {"custom_id": "r1", "url": "/v1/completions", "body": {"prompt": "x"}}],
        "line 3: custom_id: 'r1' is also the custom_id of line 2",
    ),
    (
        [{"custom_id": "a", "url": "/v1/completions", "body": {"prompt": "x", "best": 1}}],
        "line 1: body.best:",
    ),
    (
        [{"custom_id": "a", "url": "/v1/completions", "body": {"prompt": "x", "max_tokens": "5"}}],
        "line 1: body.generate_config.max_tokens",
    ),
    (
        [{"custom_id": "a", "url": "/v1/completions", "body": {"prompt": "x", "stream": True}}],
        "cannot stream",
    ),
    ([{"url": "/v1/completions", "body": {"prompt": "x"}}], "line 1: custom_id: required"),
    (
        [{"custom_id": "a", "method": "GET", "url": "/v1/completions", "body": {}}],
        "line 1: method: 'GET'",
    ),
    (
        [{"custom_id": "a", "url": "/v1/completions", "body": {"max_tokens": 1}}],
        "line 1: body.prompt: required",
    ),
    ("{not json}\n", "line 1: not a JSON object"),
]


async def test_a_bad_line_is_a_400_naming_the_line_and_field(pool: Batching) -> None:
    for lines, says in BAD_LINES:
        with pytest.raises(BadRequest) as caught:
            await pool.batches.create(requests=lines, model=pool.uid)
        assert says in caught.value.message, (lines, caught.value.message)
    assert (await pool.batches.list())["data"] == []  # nothing was recorded


async def test_other_bad_requests(pool: Batching) -> None:
    with pytest.raises(BadRequest, match=r"line 1: body\.model: required"):
        await pool.batches.create(requests=chat_lines(1))
    with pytest.raises(NotFound, match="model 'nope' is not running"):
        await pool.batches.create(requests=chat_lines(1, "nope"))
    with pytest.raises(BadRequest, match="exactly one of input_file_id or requests"):
        await pool.batches.create(model=pool.uid)
    with pytest.raises(NotFound, match="input_file_id 'file-missing'"):
        await pool.batches.create(input_file_id="file-missing")
    with pytest.raises(BadRequest, match="endpoint"):
        await pool.batches.create(requests=chat_lines(1, pool.uid), endpoint="/v1/files")
    with pytest.raises(BadRequest, match="line 1: url: '/v1/chat/completions' is not the batch's endpoint"):
        await pool.batches.create(requests=chat_lines(1, pool.uid), endpoint="/v1/completions")
    with pytest.raises(NotFound, match="batch 'batch_000000000000000000000000' does not exist"):
        await pool.batches.get("batch_000000000000000000000000")
    with pytest.raises(BadRequest, match="batch_id 'x' is invalid"):
        await pool.batches.get("x")


async def test_list_pages_newest_first(pool: Batching) -> None:
    ids = [(await pool.batches.create(requests=chat_lines(1, pool.uid)))["id"] for _ in range(3)]
    for batch_id in ids:
        await finished(pool.batches, batch_id)
    page = await pool.batches.list(limit=2)
    assert page["object"] == "list" and page["has_more"] is True and len(page["data"]) == 2
    rest = await pool.batches.list(limit=2, after=page["last_id"])
    assert rest["has_more"] is False
    assert {b["id"] for b in page["data"] + rest["data"]} == set(ids)


async def test_cancel_drops_what_has_not_started(nats_url: str, sqlite_url: str, unique: str) -> None:
    # 0.05 s per word, 8 words per request, 2 batch slots: about 0.4 s per pair of requests.
    async with batching(nats_url, sqlite_url, f"c{unique}", "echo:?delay=0.05") as pool:
        job = await pool.batches.create(requests=chat_lines(200, pool.uid, max_tokens=8))

        async def some_done() -> bool:
            counts = (await pool.batches.get(job["id"]))["request_counts"]
            return counts["completed"] >= 2

        await eventually(some_done, "the first requests of the job to be answered")
        cancelling = await pool.batches.cancel(job["id"])
        assert cancelling["status"] == "cancelling" and cancelling["cancelling_at"] is not None
        names = BatchNames(pool.prefix)
        js = pool.batches.nc.jetstream()
        info = await js.stream_info(names.requests_stream(pool.uid))
        assert info.state.messages == 0  # purged: nothing left to start
        done = await finished(pool.batches, job["id"], timeout=40)
        assert done["status"] == "cancelled" and done["cancelled_at"] is not None
        answered = done["request_counts"]["completed"]
        assert 2 <= answered < 200 and done["request_counts"]["failed"] == 0
        lines = output_lines(await pool.batches.download(done["output_file_id"]))
        ids = [line["custom_id"] for line in lines]
        assert len(ids) == len(set(ids)) == answered
        # A finished job is not cancelled again.
        assert (await pool.batches.cancel(job["id"]))["status"] == "cancelled"


async def test_a_job_that_does_not_fit_its_stream_is_refused_at_submit(
    nats_url: str, sqlite_url: str, unique: str
) -> None:
    prefix = f"f{unique}"
    async with running_registry_and_workers(
        nats_url, sqlite_url, prefix, [f"w{unique}"], batch_limits=BatchLimits(max_queued=10)
    ) as (client, _):
        # Slow requests: the first job's 8 stay in the stream (taken or not) while the second comes.
        name = f"slow-{unique}"
        await client.register_model(
            "LLM", echo_definition(name, "echo:?delay=0.5", chat_template=ECHO_CHAT_TEMPLATE)
        )
        uid = await client.launch_model(model_name=name, progress=False)
        async with await AsyncBatchClient.connect(nats_url, prefix=prefix) as batches:
            first = await batches.create(requests=chat_lines(8, uid, max_tokens=8))
            assert first["status"] == "in_progress"
            with pytest.raises(Overloaded) as caught:
                await batches.create(requests=chat_lines(3, uid, start=100))
            assert "holds 8 requests" in caught.value.message and "at most 10" in caught.value.message
            info = await batches.nc.jetstream().stream_info(BatchNames(prefix).requests_stream(uid))
            assert info.state.messages <= 8  # the refused job left nothing behind
            assert [b["id"] for b in (await batches.list())["data"]] == [first["id"]]
            await batches.cancel(first["id"])


async def test_without_jetstream_a_submit_is_a_clear_503(sqlite_url: str, unique: str) -> None:
    prefix = f"n{unique}"
    with running_nats_server(jetstream=False) as server:
        async with Registry(nats_url=server.url, db_url=sqlite_url, prefix=prefix):
            nc = await _nc(server.url)
            async with AsyncBatchClient(nc, prefix=prefix) as batches:
                with pytest.raises(Unavailable, match="JetStream is not available") as caught:
                    await batches.create(requests=chat_lines(1, "m"))
                assert "-js" in caught.value.message
                with pytest.raises(Unavailable, match="JetStream is not available"):
                    await batches.upload(b"{}")
            await nc.close()


async def _nc(url: str) -> Any:
    return await connect(url, name="test-batches")
