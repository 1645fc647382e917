"""Batch jobs in the tests: request lines, waiting for a job's status, reading its output."""

from __future__ import annotations

import json
from typing import Any

from broker_client import AsyncBatchClient
from tests.support.waits import eventually_despite_errors

FINISHED = ("completed", "failed", "cancelled", "expired")


def chat_lines(
    n: int, model: str | None = None, *, max_tokens: int = 4, start: int = 0
) -> list[dict[str, Any]]:
    """``n`` chat request lines with custom ids ``r<i>``; the body names ``model`` when given."""
    lines = []
    for i in range(start, start + n):
        body: dict[str, Any] = {
            "messages": [{"role": "user", "content": f"w{i} x y z"}],
            "max_tokens": max_tokens,
        }
        if model is not None:
            body["model"] = model
        lines.append({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": body})
    return lines


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def output_lines(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in data.decode().splitlines() if line.strip()]


async def finished(batches: AsyncBatchClient, batch_id: str, timeout: float = 60.0) -> dict[str, Any]:
    """The batch once its status is final (the registry may be restarting meanwhile)."""

    async def probe() -> dict[str, Any] | None:
        batch = await batches.get(batch_id)
        return batch if batch["status"] in FINISHED else None

    return await eventually_despite_errors(probe, f"batch {batch_id} to finish", timeout, interval=0.2)


async def progressed(
    batches: AsyncBatchClient, batch_id: str, done: int, timeout: float = 60.0
) -> dict[str, Any]:
    """The batch once at least ``done`` of its requests have their line."""

    async def probe() -> dict[str, Any] | None:
        batch = await batches.get(batch_id)
        counts = batch["request_counts"]
        return (
            batch if counts["completed"] + counts["failed"] >= done or batch["status"] in FINISHED else None
        )

    return await eventually_despite_errors(
        probe, f"batch {batch_id} to reach {done} answers", timeout, interval=0.1
    )


# The echo engine answers with the words of the prompt; this template makes the prompt the
# messages' contents.
ECHO_CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
