"""``on_own_thread``: a launch's torch work runs on a thread that ends with it, so that its OpenMP
team does not outlive the launch (``workers/builder.py`` says why that matters)."""

from __future__ import annotations

import contextvars
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from workers.builder import on_own_thread

ROOT = Path(__file__).resolve().parents[2]
_VAR: contextvars.ContextVar[str] = contextvars.ContextVar("_VAR", default="unset")


async def test_the_result_the_exception_and_the_context_come_back() -> None:
    _VAR.set("the caller's")
    main = threading.current_thread()

    def work(a: int, *, b: int) -> tuple[int, str, bool]:
        return a + b, _VAR.get(), threading.current_thread() is main

    assert await on_own_thread(work, 1, b=2) == (3, "the caller's", False)

    def fails() -> None:
        raise ValueError("bad weights: 42")

    with pytest.raises(ValueError, match="bad weights: 42"):
        await on_own_thread(fails)


async def test_the_thread_ends_with_the_call() -> None:
    ran: list[threading.Thread] = []
    await on_own_thread(lambda: ran.append(threading.current_thread()))
    ran[0].join(10)
    assert not ran[0].is_alive(), f"{ran[0].name} still runs after its call returned"


# In a fresh process: libgomp's state is the process's, and the test's own torch calls would
# leave teams of their own.
_OPENMP_TEAMS = textwrap.dedent(
    """
    import asyncio, os, time
    import torch
    from workers.builder import on_own_thread

    torch.set_num_threads(2)

    def tasks() -> int:
        return len(os.listdir("/proc/self/task"))

    def parallel() -> None:  # elementwise over far more than one grain: an OpenMP region
        x = torch.ones(2_000_000)
        for _ in range(3):
            x = x + 1

    def settled(want: int) -> int:
        deadline = time.monotonic() + 10  # a team's threads end after their master
        while tasks() > want and time.monotonic() < deadline:
            time.sleep(0.01)
        return tasks()

    async def main() -> None:
        base = tasks()
        await on_own_thread(parallel)
        own = settled(base)
        await asyncio.to_thread(parallel)
        print(base, own, tasks())

    asyncio.run(main())
    """
)


def test_no_openmp_team_outlives_the_call() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _OPENMP_TEAMS],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "2"},
    )
    assert done.returncode == 0, done.stderr
    base, own, executor = map(int, done.stdout.split())
    assert own == base, f"{own - base} thread(s) left after on_own_thread (threads: {base} before)"
    # The control: an executor thread stays, and with it its team's OpenMP thread.
    assert executor >= base + 2, f"to_thread left {executor - base} thread(s); the check sees no team"
