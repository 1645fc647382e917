"""Abandoned streams stop: a registry and a worker process, an echo model that takes 10 ms a token,
and readers of 2,000-token streams that go away after their first chunk.

Sixteen readers that asked for the keepalive (as the natserve client and the gateway do) and
then vanished: the replica drops their streams within the silence, not after 20 s. A natserve
client that reads to the end gets every chunk (it acknowledges as it reads); a `nats req`-like
reader that did not ask gets every chunk too, as before.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.msg import Msg

from broker_client import AsyncClient, Subjects
from broker_client.runtime import KEEPALIVE_HEADER, KEEPALIVE_SILENCE
from tests.support.pool import Pool, echo_definition, words
from tests.support.waits import eventually_despite_errors, within

pytestmark = pytest.mark.slow

TOKENS = 2000
DELAY = 0.01  # a token: a stream of 2,000 takes 20 s


@pytest.fixture
def pool(tmp_path: Path, nats_url: str, unique: str) -> Any:
    p = Pool(tmp_path, nats_url, f"k{unique}")
    yield p
    p.close()


async def in_flight(nc: nats.NATS, subjects: Subjects, worker_id: str) -> int:
    reply = await nc.request(subjects.worker(worker_id, "info"), b"{}", timeout=10)
    return sum(r["active"] + r["waiting"] for r in json.loads(reply.data)["replicas"])


async def test_streams_whose_readers_vanished_stop_and_read_ones_run_to_their_end(
    pool: Pool, unique: str
) -> None:
    registry, worker = pool.registry(), pool.worker(f"wk-{unique}", NATSERVE_WARM_UP="0")
    await asyncio.gather(registry.wait_ready(), worker.wait_ready())
    subjects = Subjects(pool.prefix)
    async with AsyncClient(pool.nats_url, prefix=pool.prefix, timeout=120) as client:

        async def alive() -> bool:
            return worker.name in {w["worker_id"] for w in await client.list_workers() if w["alive"]}

        await eventually_despite_errors(alive, "the worker to be alive")
        await client.register_model("LLM", echo_definition("slowecho", f"echo:?delay={DELAY}"))
        uid = await client.launch_model("slowecho", worker_id=worker.name, progress=False)
        body = {"prompt": words(TOKENS), "generate_config": {"stream": True, "max_tokens": TOKENS}}
        subject = subjects.model(uid, "generate")
        probe = await nats.connect(pool.nats_url)
        try:
            # Sixteen readers ask for the keepalive, take the first chunk, and go: their
            # connections close, as a killed process's would.
            started = time.monotonic()
            for n in range(16):
                reader = await nats.connect(pool.nats_url)
                first: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()

                async def once(msg: Msg, first: asyncio.Future[Msg] = first) -> None:
                    if not first.done():
                        first.set_result(msg)

                inbox = reader.new_inbox()
                await reader.subscribe(inbox, cb=once)
                request = {**body, "request_id": f"gone-{n}", "keepalive": 16}
                await reader.publish(subject, json.dumps(request).encode(), reply=inbox)
                msg = await within(first, f"the first chunk of reader {n}")
                assert KEEPALIVE_HEADER in (msg.headers or {})
                await reader.close()
            assert await in_flight(probe, subjects, worker.name) == 16

            async def dropped() -> bool:
                return await in_flight(probe, subjects, worker.name) == 0

            bound = KEEPALIVE_SILENCE + 16 * 2 * DELAY + 5  # the silence, two windows, slack
            await eventually_despite_errors(dropped, "the abandoned streams to stop", timeout=bound)
            took = time.monotonic() - started
            assert took < TOKENS * DELAY / 2, f"the abandoned streams ran {took:.1f} s"
            print(f"16 abandoned streams stopped {took:.1f} s after they started")

            # A natserve client reading to the end acknowledges as it reads: all of it arrives.
            short = {"stream": True, "max_tokens": 300}
            model: Any = await client.get_model(uid)
            chunks = [c async for c in await model.generate(words(300), short)]
            assert "".join(c["choices"][0]["text"] for c in chunks).split() == words(300).split()

            # A reader that did not ask (`nats req --wait-for-empty`) gets its whole stream.
            got: list[Msg] = []
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

            async def collect(msg: Msg) -> None:
                got.append(msg)
                if not msg.data and not done.done():
                    done.set_result(None)

            inbox = probe.new_inbox()
            await probe.subscribe(inbox, cb=collect)
            raw = {"prompt": words(300), "generate_config": short}
            await probe.publish(subject, json.dumps(raw).encode(), reply=inbox)
            await within(done, "the raw reader's stream", timeout=60)
            assert len(got) >= 300 and KEEPALIVE_HEADER not in (got[0].headers or {})
        finally:
            await probe.close()
