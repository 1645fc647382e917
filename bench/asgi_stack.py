"""Which ASGI stack for the HTTP gateway: Starlette or FastAPI, on uvicorn, measured.

One trivial JSON route (``POST /echo``: read a small JSON body, answer a small JSON object),
served by uvicorn (httptools) in a spawned process, one stack at a time, with the asyncio loop
and with uvloop; the load comes from ``bench/_http.py``'s keep-alive client in this process at
concurrency 1 and 256. Stacks:

    raw-asgi         the endpoint as a bare ASGI callable, no framework: the floor
    starlette-asgi   that callable as the endpoint of a Starlette ``Route`` (routing only)
    starlette        a Starlette ``Route`` whose endpoint reads ``request.body()`` and returns a
                     ``Response`` of ``json.dumps`` bytes (what the gateway's routes do)
    fastapi          the same endpoint on a FastAPI app (``Request`` in, ``Response`` out)
    fastapi-pydantic the FastAPI way: a pydantic body model in, a dict out (FastAPI validates
                     and serialises)

Each point is measured in rounds, the stacks in turn within a round, and the medians of the
rounds are reported, as in ``bench/overhead.py``.

    python bench/asgi_stack.py [--seconds 2] [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pydantic import BaseModel  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import Response  # noqa: E402

from bench._http import HttpConnection, connect  # noqa: E402

STACKS = ("raw-asgi", "starlette-asgi", "starlette", "fastapi", "fastapi-pydantic")
LOOPS = ("asyncio", "uvloop")
BODY = json.dumps({"model": "echo", "prompt": "natserve overhead probe " * 4, "max_tokens": 16}).encode()


class _Body(BaseModel):
    model: str
    prompt: str
    max_tokens: int | None = None


_HEADERS = [(b"content-type", b"application/json")]


async def _raw_echo(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    body = json.loads(b"".join(chunks))
    data = json.dumps({"object": "echo", "text": body["prompt"]}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [*_HEADERS, (b"content-length", str(len(data)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": data})


class _RawEcho:
    """An ASGI endpoint inside a Starlette route: no Request and Response objects."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await _raw_echo(scope, receive, send)


def _app(stack: str) -> Any:
    async def echo(request: Request) -> Response:
        body = json.loads(await request.body())
        return Response(
            json.dumps({"object": "echo", "text": body["prompt"]}).encode(), media_type="application/json"
        )

    if stack == "raw-asgi":
        return _raw_echo
    if stack in ("starlette", "starlette-asgi"):
        from starlette.applications import Starlette
        from starlette.routing import Route

        endpoint = _RawEcho() if stack == "starlette-asgi" else echo
        return Starlette(routes=[Route("/echo", endpoint, methods=["POST"])])
    from fastapi import FastAPI

    app = FastAPI()
    if stack == "fastapi":
        app.add_api_route("/echo", echo, methods=["POST"])
        return app

    async def echo_model(body: _Body) -> dict[str, Any]:
        return {"object": "echo", "text": body.prompt}

    app.add_api_route("/echo", echo_model, methods=["POST"])
    return app


def _serve(stack: str, loop: str, port: int, ready: Any) -> None:
    import uvicorn

    config = uvicorn.Config(
        _app(stack),
        host="127.0.0.1",
        port=port,
        loop=loop,
        http="httptools",
        access_log=False,
        log_level="warning",
        lifespan="off",
    )

    class Server(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            ready.set()

    server = Server(config)

    async def main() -> None:
        await server.serve()

    if loop == "uvloop":
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _measure(conns: list[HttpConnection], seconds: float) -> dict[str, float]:
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def loop(conn: HttpConnection) -> None:
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            await conn.post_json("/echo", BODY)
            latencies.append(time.perf_counter() - t0)

    for conn in conns[:50]:  # warm-up
        await conn.post_json("/echo", BODY)
    start = time.perf_counter()
    await asyncio.gather(*(loop(c) for c in conns))
    elapsed = time.perf_counter() - start
    latencies.sort()
    return {"rps": len(latencies) / elapsed, "p50_us": statistics.median(latencies) * 1e6}


async def _point(port: int, concurrency: int, seconds: float) -> dict[str, float]:
    conns = [await connect("127.0.0.1", port) for _ in range(concurrency)]
    try:
        return await _measure(conns, seconds)
    finally:
        for conn in conns:
            conn.close()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    ctx = mp.get_context("spawn")
    servers: dict[tuple[str, str], tuple[Any, int]] = {}
    try:
        for stack in STACKS:
            for loop in LOOPS:
                port, ready = _free_port(), ctx.Event()
                proc = ctx.Process(target=_serve, args=(stack, loop, port, ready), daemon=True)
                proc.start()
                if not ready.wait(60):
                    raise RuntimeError(f"{stack} on {loop} did not start within 60 s")
                servers[(stack, loop)] = (proc, port)
        rounds: dict[str, list[dict[str, float]]] = {}
        for _ in range(args.rounds):
            for c in (1, 256):
                for (stack, loop), (_, port) in servers.items():
                    point = asyncio.run(_point(port, c, args.seconds))
                    rounds.setdefault(f"{stack}/{loop}/c{c}", []).append(point)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.join(10)

    results = {
        key: {metric: statistics.median(r[metric] for r in points) for metric in ("rps", "p50_us")}
        for key, points in rounds.items()
    }
    print(f"machine: {os.cpu_count()} cores; medians of {args.rounds} rounds of {args.seconds:g} s")
    print(
        f"{'stack':18}{'loop':>9}{'req/s c=1':>12}{'p50 us c=1':>12}{'req/s c=256':>13}{'p50 us c=256':>14}"
    )
    for stack in STACKS:
        for loop in LOOPS:
            one, many = results[f"{stack}/{loop}/c1"], results[f"{stack}/{loop}/c256"]
            print(
                f"{stack:18}{loop:>9}{one['rps']:12.0f}{one['p50_us']:12.0f}"
                f"{many['rps']:13.0f}{many['p50_us']:14.0f}"
            )
    if args.json:
        print(json.dumps({f"{k}/{m}": round(v, 1) for k, r in results.items() for m, v in r.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
