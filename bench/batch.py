"""Batch jobs against the online path, on the tiny and small random-weight Llamas of
bench/engine.py, in one run on one machine.

Two questions:

1. Throughput: a job of N requests (``batches.create`` to ``completed``, output file written)
   against the same N requests sent online by C concurrent callers, C being the worker's batch
   slots per replica (the job's concurrency). Target: the job's tokens/s >= 0.9x the online one.
2. Latency: the online p50 and p99 at concurrency 8 with no job, then with a job running beside
   it (the job is larger than the window, and cancelled after). Target: p99 rises by <= 20%.
   The two windows alternate (without, with, without, with...) so that a drift of the machine's
   load falls on both.

    python bench/batch.py [--models tiny,small] [--requests 64] [--slots 2] [--seconds 6]
                          [--rounds 2] [--new-tokens 32] [--json]

The registry and one worker run in a spawned process (bench/_pool.py, as natserve up runs them),
on a nats-server with JetStream on a temporary store; the clients run here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.engine import CPU, build_model, make_prompts

TARGET_RATIO = 0.9
TARGET_P99_RISE = 0.20
ONLINE_CONCURRENCY = 8


def _pool(url: str, home: str, ready: Any, stop: Any, slots: int) -> None:
    import os

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as natserve's CLI runs its worker
    from bench._pool import run_pool

    run_pool(url, home, ready, stop, steady=True, batch_slots=slots)


async def _poll(probe: Any, what: str, interval: float, timeout: float = 300.0) -> None:
    """Until ``await probe()`` is true (a bounded poll of the job's state, as a client does)."""
    deadline = time.monotonic() + timeout
    while not await probe():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {timeout:g} s")
        await asyncio.sleep(interval)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _lines(uid: str, prompts: list[str], new_tokens: int, tag: str) -> list[dict[str, Any]]:
    return [
        {
            "custom_id": f"{tag}-{i}",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"model": uid, "prompt": p, "max_tokens": new_tokens, "temperature": 0},
        }
        for i, p in enumerate(prompts)
    ]


async def _online(handle: Any, prompts: list[str], new_tokens: int, concurrency: int) -> tuple[float, int]:
    """The prompts sent by ``concurrency`` callers: (seconds, completion tokens)."""
    queue = list(prompts)
    tokens = 0

    async def caller() -> None:
        nonlocal tokens
        while queue:
            prompt = queue.pop()
            reply = await handle.generate(
                prompt=prompt, generate_config={"max_tokens": new_tokens, "temperature": 0}
            )
            tokens += int(reply["usage"]["completion_tokens"])

    t0 = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return time.perf_counter() - t0, tokens


async def _job(batches: Any, lines: list[dict[str, Any]]) -> tuple[float, int]:
    """One job to its end: (seconds from create to completed, completion tokens in its output)."""
    t0 = time.perf_counter()
    job = await batches.create(requests=lines, endpoint="/v1/completions")
    state = {"job": job}

    async def ended() -> bool:
        state["job"] = await batches.get(job["id"])
        return state["job"]["status"] in ("completed", "failed", "cancelled", "expired")

    await _poll(ended, f"batch {job['id']} to end", 0.05)
    job = state["job"]
    elapsed = time.perf_counter() - t0
    if job["status"] != "completed" or job["request_counts"]["failed"]:
        raise RuntimeError(f"the job ended {job['status']}: {job['request_counts']} {job.get('errors')}")
    output = await batches.download(job["output_file_id"])
    tokens = sum(
        json.loads(line)["response"]["body"]["usage"]["completion_tokens"]
        for line in output.splitlines()
        if line
    )
    return elapsed, tokens


async def _latencies(handle: Any, prompts: list[str], new_tokens: int, seconds: float) -> list[float]:
    """Online latencies of ``ONLINE_CONCURRENCY`` callers for ``seconds``."""
    out: list[float] = []
    deadline = time.perf_counter() + seconds

    async def caller(i: int) -> None:
        k = i
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            await handle.generate(
                prompt=prompts[k % len(prompts)], generate_config={"max_tokens": new_tokens, "temperature": 0}
            )
            out.append(time.perf_counter() - t0)
            k += ONLINE_CONCURRENCY

    await asyncio.gather(*(caller(i) for i in range(ONLINE_CONCURRENCY)))
    return out


async def bench_model(
    name: str, url: str, workdir: Path, args: argparse.Namespace, log: Any
) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from bench._pool import llm_definition
    from broker_client import AsyncBatchClient, AsyncClient

    path = build_model(name, workdir / name, CPU)
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompts = make_prompts(tokenizer, args.requests, args.prompt_len, seed=1)
    result: dict[str, Any] = {"model": name, "requests": args.requests, "slots": args.slots}
    async with AsyncClient(url, timeout=600) as client:
        await client.register_model("LLM", llm_definition(f"b-{name}", f"file://{path}"))
        uid = await client.launch_model(model_name=f"b-{name}", model_uid=f"b-{name}", progress=False)
        handle: Any = await client.get_model(uid)
        await handle.generate(prompt=prompts[0], generate_config={"max_tokens": 4})  # warm
        batches = await AsyncBatchClient.connect(url, timeout=120)
        try:
            # Warm, as the online path is: the uid's stream made and found by the worker.
            await _job(batches, _lines(uid, prompts[:2], 4, "warm"))
            online_tps, job_tps, ratios = [], [], []
            for r in range(args.rounds):
                # Side by side, in turns (online first, then the job first): on a loaded machine a
                # round's pair sees the same load, and the median of the pairs' ratios is the figure.
                async def online() -> float:
                    seconds, tokens = await _online(handle, prompts, args.new_tokens, args.slots)
                    return tokens / seconds

                async def job(r: int = r) -> float:
                    seconds, tokens = await _job(batches, _lines(uid, prompts, args.new_tokens, f"t{r}"))
                    return tokens / seconds

                if r % 2 == 0:
                    online_tps.append(await online())
                    job_tps.append(await job())
                else:
                    job_tps.append(await job())
                    online_tps.append(await online())
                ratios.append(job_tps[-1] / online_tps[-1])
                log(f"{name} round {r}: online {online_tps[-1]:.0f} tok/s, job {job_tps[-1]:.0f} tok/s")
            result["online_tokens_per_s"] = statistics.median(online_tps)
            result["job_tokens_per_s"] = statistics.median(job_tps)
            result["job_over_online"] = statistics.median(ratios)
            result["job_over_online_rounds"] = ratios

            without: list[float] = []
            with_job: list[float] = []
            rises: list[float] = []
            # A job larger than the window: it is still running when the window ends.
            per_second = max(result["job_tokens_per_s"] / args.new_tokens, 1.0)
            big = int(per_second * args.seconds * 3) + 20
            for r in range(args.rounds):
                alone = await _latencies(handle, prompts, args.new_tokens, args.seconds)
                without += alone
                job = await batches.create(
                    requests=_lines(
                        uid, (prompts * (big // len(prompts) + 1))[:big], args.new_tokens, f"l{r}"
                    ),
                    endpoint="/v1/completions",
                )
                batch_id = job["id"]

                async def running(batch_id: str = batch_id) -> bool:
                    return bool((await batches.get(batch_id))["request_counts"]["completed"] >= args.slots)

                # Until the job's requests run beside the online ones.
                await _poll(running, "the latency job's first requests", 0.05)
                beside = await _latencies(handle, prompts, args.new_tokens, args.seconds)
                with_job += beside
                rises.append(_pct(beside, 0.99) / _pct(alone, 0.99) - 1)
                state = await batches.get(job["id"])
                if state["status"] != "in_progress":
                    raise RuntimeError(
                        f"the latency job ended during the window ({state['status']}): make it larger"
                    )
                await batches.cancel(job["id"])

                async def cancelled(batch_id: str = batch_id) -> bool:
                    return bool((await batches.get(batch_id))["status"] == "cancelled")

                await _poll(cancelled, "the latency job to be cancelled", 0.2)
                log(
                    f"{name} round {r}: {len(without)} / {len(with_job)} online requests without / with a job"
                )
            for label, values in (("without", without), ("with", with_job)):
                result[f"p50_{label}_job_s"] = _pct(values, 0.50)
                result[f"p99_{label}_job_s"] = _pct(values, 0.99)
                result[f"requests_{label}_job"] = len(values)
            # Each round's pair of windows sees the same load: the median of their rises is the
            # figure; the rise of the pooled p99 follows the worst round of a loaded machine.
            result["p99_rise"] = statistics.median(rises)
            result["p99_rise_pooled"] = result["p99_with_job_s"] / result["p99_without_job_s"] - 1
            result["p99_rise_rounds"] = rises
            result["p50_rise"] = result["p50_with_job_s"] / result["p50_without_job_s"] - 1
        finally:
            await batches.close()
        await client.terminate_model(uid)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="tiny,small")
    parser.add_argument("--requests", type=int, default=128, help="requests of the throughput job")
    parser.add_argument(
        "--slots", type=int, default=2, help="the worker's batch slots (the job's concurrency)"
    )
    parser.add_argument("--seconds", type=float, default=6.0, help="latency window, each round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from tests.support.nats_server import NatsServer

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    server = NatsServer().start()
    ctx = mp.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="natserve-bench-batch-") as tmp:
        proc = ctx.Process(target=_pool, args=(server.url, tmp, ready, stop, args.slots), daemon=True)
        proc.start()
        try:
            if not ready.wait(180):
                raise RuntimeError("the pool was not ready within 180 s")
            for name in args.models.split(","):
                results.append(asyncio.run(bench_model(name, server.url, Path(tmp), args, log)))
        finally:
            stop.set()
            proc.join(60)
            server.close()

    print(
        f"batch slots {args.slots}, {args.requests} requests of {args.new_tokens} tokens per throughput run"
    )
    print(
        f"{'model':<7}{'online tok/s':>14}{'job tok/s':>11}{'ratio':>7}"
        "   p50 / p99 at C=8, without -> with a job"
    )
    ok = True
    for r in results:
        ratio_ok = r["job_over_online"] >= TARGET_RATIO
        rise_ok = r["p99_rise"] <= TARGET_P99_RISE
        ok = ok and ratio_ok and rise_ok
        print(
            f"{r['model']:<7}{r['online_tokens_per_s']:>14.0f}{r['job_tokens_per_s']:>11.0f}"
            f"{r['job_over_online']:>7.2f}   "
            f"{r['p50_without_job_s'] * 1e3:.0f} / {r['p99_without_job_s'] * 1e3:.0f} ms"
            f" -> {r['p50_with_job_s'] * 1e3:.0f} / {r['p99_with_job_s'] * 1e3:.0f} ms"
            f" (p99 {r['p99_rise']:+.0%}, median of the rounds; targets: ratio >= {TARGET_RATIO}"
            f" {'ok' if ratio_ok else 'MISSED'},"
            f" p99 rise <= {TARGET_P99_RISE:.0%} {'ok' if rise_ok else 'MISSED'})"
        )
    if args.json:
        print(json.dumps({"slots": args.slots, "results": results}))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
