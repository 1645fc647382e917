"""``natserve batch``: batch jobs from the command line.

    natserve batch submit FILE.jsonl [--model UID] [--endpoint URL] [--wait]
    natserve batch status ID        (--json: the batch object)
    natserve batch results ID [-o FILE] [--errors]
    natserve batch list [--limit N]
    natserve batch cancel ID

``submit`` uploads the file to the pool's object store and creates the job from it (any size:
the file travels in the object store's chunks); it prints the batch id, or with ``--wait`` follows
the job and prints its final state. ``results`` writes the output JSONL (``--errors``: the error
file) to stdout or ``-o FILE``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["add_commands", "run"]

_FINISHED = ("completed", "failed", "cancelled", "expired")
# Between two looks at a job that --wait follows.
_POLL = 1.0


def add_commands(parser: argparse.ArgumentParser, common: list[argparse.ArgumentParser]) -> None:
    sub = parser.add_subparsers(dest="batch_command", metavar="BATCH_COMMAND", required=True)

    def add(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, parents=common)

    p = add("submit", "submit a JSONL file of requests as a batch job")
    p.add_argument("file", metavar="FILE.jsonl", type=Path)
    p.add_argument("--model", metavar="UID", help="the model of the lines whose body names none")
    p.add_argument("--endpoint", help="the url every line must have (/v1/chat/completions, ...)")
    p.add_argument("--wait", action="store_true", help="follow the job until it ends")
    p = add("status", "show a batch job")
    p.add_argument("batch_id", metavar="ID")
    p = add("results", "write a finished job's output JSONL")
    p.add_argument("batch_id", metavar="ID")
    p.add_argument("-o", "--output", type=Path, help="file to write (default: stdout)")
    p.add_argument("--errors", action="store_true", help="the error file instead of the output")
    p = add("list", "list batch jobs, newest first")
    p.add_argument("--limit", type=int, default=20)
    p = add("cancel", "cancel a batch job: what has not started is dropped")
    p.add_argument("batch_id", metavar="ID")


def run(args: argparse.Namespace, nats_options: dict[str, Any]) -> int:
    return asyncio.run(_run(args, nats_options))


def _summary(batch: dict[str, Any]) -> str:
    counts = batch["request_counts"]
    line = (
        f"{batch['id']}  {batch['status']}  {counts['completed']} completed, {counts['failed']} failed "
        f"of {counts['total']}"
    )
    if batch.get("output_file_id"):
        line += f"  output {batch['output_file_id']}"
    if batch.get("error_file_id"):
        line += f"  errors {batch['error_file_id']}"
    errors = (batch.get("errors") or {}).get("data") or []
    for error in errors:
        line += f"\n  error: {error.get('message')}"
    return line


async def _run(args: argparse.Namespace, nats_options: dict[str, Any]) -> int:
    from broker_client import AsyncBatchClient, NotFound

    settings = args.settings
    client = await AsyncBatchClient.connect(settings.nats_url, prefix=settings.prefix, **nats_options)
    async with client:
        command = args.batch_command
        if command == "submit":
            data = args.file.read_bytes()
            file_id = await client.upload(data, filename=args.file.name)
            batch = await client.create(input_file_id=file_id, model=args.model, endpoint=args.endpoint)
            if not args.wait:
                print(batch["id"])
                return 0
            while batch["status"] not in _FINISHED:
                counts = batch["request_counts"]
                done = counts["completed"] + counts["failed"]
                print(f"{batch['id']}  {batch['status']}  {done}/{counts['total']}", file=sys.stderr)
                await asyncio.sleep(_POLL)  # polling the job's state for the operator
                batch = await client.get(batch["id"])
            print(_summary(batch))
            return 0 if batch["status"] == "completed" else 1
        if command == "status":
            batch = await client.get(args.batch_id)
            print(json.dumps(batch, indent=2) if args.json else _summary(batch))
            return 0
        if command == "results":
            batch = await client.get(args.batch_id)
            result_id = batch.get("error_file_id" if args.errors else "output_file_id")
            if not result_id:
                if batch["status"] not in _FINISHED:
                    raise NotFound(f"batch {args.batch_id} is {batch['status']}: no results yet")
                what = "error" if args.errors else "output"
                raise NotFound(f"batch {args.batch_id} ({batch['status']}) has no {what} file")
            content = await client.download(str(result_id))
            if args.output is not None:
                args.output.write_bytes(content)
                print(f"wrote {len(content)} bytes to {args.output}", file=sys.stderr)
            else:
                sys.stdout.buffer.write(content)
                sys.stdout.flush()
            return 0
        if command == "list":
            page = await client.list(limit=args.limit)
            if args.json:
                print(json.dumps(page, indent=2))
            else:
                for batch in page["data"]:
                    created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(batch["created_at"]))
                    print(f"{created}  {_summary(batch)}")
            return 0
        batch = await client.cancel(args.batch_id)
        print(_summary(batch))
        return 0
