"""An embedding replica (the packaged all-MiniLM-L6-v2) behind a server with a small max_payload."""

from __future__ import annotations

import math
from collections.abc import Iterator

import msgpack
import pytest

from broker_client import BadRequest
from broker_client.runtime import NatsTransport, connect
from tests.support.models import minilm_path
from tests.support.nats_server import NatsServer, running_nats_server
from tests.support.waits import within
from tests.support.worker import Harness
from workers import Worker, WorkerSettings

SMALL_PAYLOAD = 64 * 1024


@pytest.fixture
def small_payload_server() -> Iterator[NatsServer]:
    # max_payload exists only in the config file, not as a flag.
    with running_nats_server(config=f"max_payload: {SMALL_PAYLOAD}\n") as server:
        yield server


async def test_embeddings_larger_than_max_payload(small_payload_server: NatsServer, unique: str) -> None:
    url = small_payload_server.url
    worker = Worker(
        WorkerSettings(url, prefix=f"e{unique}", device="cpu", heartbeat_interval=30, drain_timeout=5)
    )
    await worker.start()
    nc = await connect(url, name="test-embed")
    transport = NatsTransport(nc)
    harness = Harness(worker, nc, transport)
    try:
        assert nc.max_payload == SMALL_PAYLOAD
        uid = f"minilm-{unique}"
        definition = {
            "model_name": "minilm",
            "dimensions": 384,
            "max_tokens": 256,
            "language": ["en"],
            "model_uri": str(minilm_path()),
        }
        reply = await harness.launch(uid, definition, model_type="embedding")
        assert reply["memory_bytes"] > 0

        one = await harness.call(uid, "embed", {"input": "A man is eating food."})
        assert one["object"] == "list" and one["model"] == uid
        assert len(one["data"]) == 1 and len(one["data"][0]["embedding"]) == 384
        assert one["usage"]["prompt_tokens"] > 0

        texts = [f"sentence number {i} about the worker pool" for i in range(200)]
        many = await within(harness.call(uid, "embed", {"input": texts}), "200 embeddings", 120)
        # The reply only fits the server in parts; the transport put them back together.
        assert len(msgpack.packb(many)) > 5 * SMALL_PAYLOAD
        assert [d["index"] for d in many["data"]] == list(range(200))
        assert all(d["object"] == "embedding" and len(d["embedding"]) == 384 for d in many["data"])
        # MiniLM normalises its vectors.
        assert all(abs(math.hypot(*d["embedding"]) - 1) < 1e-4 for d in many["data"])
        assert many["data"][0]["embedding"] != many["data"][1]["embedding"]
        assert many["usage"]["total_tokens"] == many["usage"]["prompt_tokens"] > 200

        with pytest.raises(BadRequest) as info:
            await harness.call(uid, "generate", {"prompt": "hi"})
        assert "cannot generate" in info.value.message and "abilities are embed" in info.value.message

        # An LLM-only engine URI is refused for embedding models.
        with pytest.raises(BadRequest):
            await harness.launch(
                f"bad-{unique}", {**definition, "model_uri": "echo:"}, model_type="embedding"
            )
    finally:
        await within(worker.stop(), "worker stop", 30)
        await transport.close()
        await nc.close()
