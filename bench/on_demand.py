"""What a start on demand costs: the first request to a model scaled to zero, against an
explicit launch followed by the same request, side by side.

on demand: a model launched with ``min_replicas=0`` (nothing loaded); one timed request, which
the registry holds, starts the model with and hands over to its replica (overflow subject).
explicit: ``launch_model`` of the same model (waits until ready), then the same request.
warm: the next request on the started model.

Each round runs both back to back on the registry and worker of ``bench/_pool.py`` (one process,
as ``natserve up``), for the echo engine (no weights: natserve's own cost) and the tiny random
Llama (a real transformers load); medians of the rounds are reported, and the ratio
on demand / explicit, whose excess over 1 is what holding and handing over add.

    python bench/on_demand.py [--rounds 5] [--json]
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._pool import llm_definition, run_pool  # noqa: E402
from tests.support.nats_server import NatsServer  # noqa: E402


async def _one(client: object, name: str, uid: str, on_demand: bool) -> tuple[float, float]:
    """(seconds to the first reply from the launch on, seconds of the next request)."""
    from broker_client import AsyncClient

    assert isinstance(client, AsyncClient)
    options = {"min_replicas": 0, "idle_timeout": 600} if on_demand else {}
    started = time.perf_counter()
    await client.launch_model(name, model_uid=uid, progress=False, **options)
    model = await client.get_model(uid)
    await model.generate("on demand probe", {"max_tokens": 4})
    first = time.perf_counter() - started
    t = time.perf_counter()
    await model.generate("on demand probe", {"max_tokens": 4})
    warm = time.perf_counter() - t
    await client.terminate_model(uid)
    return first, warm


async def _bench(url: str, rounds: int, tiny: str) -> dict[str, float]:
    from broker_client import AsyncClient

    results: dict[str, float] = {}
    async with AsyncClient(url, timeout=300) as client:
        models = {"echo": "echo:", "tiny": f"file://{tiny}"}
        for kind, uri in models.items():
            await client.register_model("LLM", llm_definition(f"{kind}-od", uri))
            await _one(client, f"{kind}-od", f"{kind}-warmup", on_demand=False)  # first imports
            samples: dict[str, list[float]] = {"on_demand": [], "explicit": [], "warm": []}
            for i in range(rounds):
                first, warm = await _one(client, f"{kind}-od", f"{kind}-d{i}", on_demand=True)
                samples["on_demand"].append(first)
                samples["warm"].append(warm)
                first, _ = await _one(client, f"{kind}-od", f"{kind}-e{i}", on_demand=False)
                samples["explicit"].append(first)
            for key, values in samples.items():
                results[f"{kind}_{key}_ms"] = statistics.median(values) * 1000
            ratios = [d / e for d, e in zip(samples["on_demand"], samples["explicit"], strict=True)]
            results[f"{kind}_ratio"] = statistics.median(ratios)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5, help="rounds of on demand then explicit")
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    args = parser.parse_args()

    from tests.support.models import build_tiny_llama

    tiny = build_tiny_llama(Path(tempfile.mkdtemp(prefix="natserve-bench-tiny-")))
    server = NatsServer().start()
    ctx = mp.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    home = tempfile.mkdtemp(prefix="natserve-bench-")
    pool = ctx.Process(target=run_pool, args=(server.url, home, ready, stop), kwargs={"steady": True})
    pool.start()
    try:
        if not ready.wait(120):
            raise RuntimeError("registry and worker were not ready within 120 s")
        results = asyncio.run(_bench(server.url, args.rounds, str(tiny)))
    finally:
        stop.set()
        pool.join(30)
        if pool.is_alive():
            pool.kill()
        server.stop()

    print(f"machine: {os.cpu_count()} cores; medians of {args.rounds} rounds (ms)")
    print(f"{'':8}{'on demand':>12}{'explicit':>12}{'ratio':>8}{'warm':>10}")
    for kind in ("echo", "tiny"):
        r = results
        print(
            f"{kind:8}{r[f'{kind}_on_demand_ms']:12.1f}{r[f'{kind}_explicit_ms']:12.1f}"
            f"{r[f'{kind}_ratio']:8.2f}{r[f'{kind}_warm_ms']:10.1f}"
        )
    if args.json:
        print(json.dumps({k: round(v, 4) for k, v in results.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
