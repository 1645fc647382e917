"""What natserve costs on top of NATS: the full path against raw nats-py, side by side.

natserve: AsyncClient -> NATS -> worker (echo engine, which answers at once without a
model) -> reply, with the registry and worker in their own process.
raw: nats-py request-reply against a raw nats-py responder in its own process, with a
reply of the same size, on the same nats-server in the same run.

Reports requests/s at concurrency 1 and 256 and p50/p99 latency, and their ratios: each point is
measured in rounds (raw, then natserve, back to back) and the medians of the rounds are reported,
ratios included, so that a machine whose speed drifts during the run hits both sides alike.

    python bench/overhead.py [--seconds 2] [--rounds 5] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._pool import llm_definition, run_pool  # noqa: E402
from tests.support.nats_server import NatsServer  # noqa: E402

PROMPT = "natserve overhead probe " * 4
ECHO_MODEL = llm_definition("echo-bench", "echo:")


class EventLike(Protocol):
    """What the raw responder uses of a multiprocessing Event."""

    def set(self) -> None: ...
    def wait(self, timeout: float | None = None) -> bool: ...


def _run_raw_responder(url: str, subject: str, reply_size: int, ready: EventLike, stop: EventLike) -> None:
    import nats

    async def main() -> None:
        nc = await nats.connect(url)
        reply = json.dumps({"text": "x" * max(0, reply_size - 12)}).encode()

        async def cb(msg):  # type: ignore[no-untyped-def]
            await msg.respond(reply)

        await nc.subscribe(subject, queue="q", cb=cb)
        await nc.flush()
        ready.set()
        await asyncio.get_running_loop().run_in_executor(None, stop.wait)
        await nc.drain()

    asyncio.run(main())


async def _measure(
    call: Callable[[], Awaitable[object]], concurrency: int, seconds: float
) -> dict[str, float]:
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def loop() -> None:
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - t0)

    for _ in range(min(50, concurrency * 5)):  # warm-up
        await call()
    start = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    latencies.sort()
    return {
        "rps": len(latencies) / elapsed,
        "p50_us": statistics.median(latencies) * 1e6,
        "p99_us": latencies[int(len(latencies) * 0.99) - 1] * 1e6,
        "n": len(latencies),
    }


async def _bench(url: str, seconds: float, rounds_per_point: int) -> dict[str, float]:
    import nats

    from broker_client import AsyncClient, AsyncGenerateModelHandle

    results: dict[str, float] = {}
    async with AsyncClient(url) as client:
        await client.register_model(model_type="LLM", model=ECHO_MODEL, persist=False)
        uid = await client.launch_model(model_name="echo-bench", progress=False)
        model = await client.get_model(model_uid=uid)
        assert isinstance(model, AsyncGenerateModelHandle)
        sample = await model.generate(prompt=PROMPT, generate_config={"max_tokens": 16})
        reply_size = len(json.dumps(sample))

        ctx = mp.get_context("spawn")
        ready, stop = ctx.Event(), ctx.Event()
        raw_subject = "bench.raw.generate"
        proc = ctx.Process(target=_run_raw_responder, args=(url, raw_subject, reply_size, ready, stop))
        proc.start()
        if not ready.wait(30):
            raise RuntimeError("raw responder did not start within 30 s")
        nc = await nats.connect(url)
        raw_body = json.dumps({"prompt": PROMPT, "generate_config": {"max_tokens": 16}}).encode()

        async def raw_call() -> object:
            return await nc.request(raw_subject, raw_body, timeout=30)

        async def natserve_call() -> object:
            return await model.generate(prompt=PROMPT, generate_config={"max_tokens": 16})

        try:
            for c in (1, 256):
                # Rounds of raw then natserve, back to back, so that drift in the machine's speed
                # (other tenants, frequency) hits both alike; the medians of the rounds count.
                rounds = [
                    (await _measure(raw_call, c, seconds), await _measure(natserve_call, c, seconds))
                    for _ in range(rounds_per_point)
                ]
                for key in ("rps", "p50_us", "p99_us"):
                    results[f"raw_{key}_c{c}"] = statistics.median(r[key] for r, _ in rounds)
                    results[f"natserve_{key}_c{c}"] = statistics.median(n[key] for _, n in rounds)
                results[f"ratio_throughput_c{c}"] = statistics.median(n["rps"] / r["rps"] for r, n in rounds)
                results[f"p50_ratio_c{c}"] = statistics.median(n["p50_us"] / r["p50_us"] for r, n in rounds)
                results[f"p99_ratio_c{c}"] = statistics.median(n["p99_us"] / r["p99_us"] for r, n in rounds)
        finally:
            await nc.close()
            stop.set()
            proc.join(10)
        await client.terminate_model(model_uid=uid)
    results["reply_bytes"] = reply_size
    return results


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=2.0, help="measuring time per round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of raw then natserve per point")
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    args = parser.parse_args()

    server = NatsServer().start()
    ctx = mp.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    home = tempfile.mkdtemp(prefix="natserve-bench-")
    pool = ctx.Process(
        target=run_pool,
        args=(server.url, home, ready, stop),
        kwargs={"steady": True},  # natserve up's heartbeat interval (2 s)
    )
    pool.start()
    try:
        if not ready.wait(120):
            raise RuntimeError("registry and worker were not ready within 120 s")
        results = asyncio.run(_bench(server.url, args.seconds, args.rounds))
    finally:
        stop.set()
        pool.join(30)
        if pool.is_alive():
            pool.kill()
        server.stop()

    print(
        f"machine: {os.cpu_count()} cores; reply {results['reply_bytes']:.0f} bytes; "
        f"medians of {args.rounds} rounds of {args.seconds:g} s"
    )
    print(f"{'':14}{'natserve':>12}{'raw nats-py':>14}{'ratio':>8}")
    for c in (1, 256):
        ns_rps, raw_rps = results[f"natserve_rps_c{c}"], results[f"raw_rps_c{c}"]
        print(f"req/s c={c:<5}{ns_rps:12.0f}{raw_rps:14.0f}{results[f'ratio_throughput_c{c}']:8.2f}")
        for p in ("p50", "p99"):
            ns, raw = results[f"natserve_{p}_us_c{c}"], results[f"raw_{p}_us_c{c}"]
            print(f"{p} us c={c:<5}{ns:12.0f}{raw:14.0f}{results[f'{p}_ratio_c{c}']:8.2f}")
    if args.json:
        print(json.dumps({k: round(v, 4) for k, v in results.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
