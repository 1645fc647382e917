"""The echo engine's slots (``echo:?slots=N``): requests queue for a slot first come first served,
and a request that ends while it queues (cancel, a cancelled reader, close, ``aclose``) leaves the
queue at once without losing a slot. The rest of its contract is tests/engines/test_contract.py.

Every wait is bounded by ``asyncio.wait_for``; nothing sleeps to synchronise: a reader signals
that it is about to read, and it queues within that same step of the loop.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.support.engines import GREEDY, TIMEOUT, collect, next_delta
from workers.engines.api import (
    Constraint,
    Delta,
    DeltaStream,
    EngineClosedError,
    InvalidRequestError,
    RequestCancelledError,
)
from workers.engines.echo import EchoEngine

WORDS = "one two three four five six seven eight".split()


async def queued_reader(stream: DeltaStream) -> asyncio.Task[Delta]:
    """A task that reads ``stream``'s first Delta, returned once it queues for a slot."""
    about_to_read = asyncio.Event()

    async def read() -> Delta:
        about_to_read.set()
        return await anext(stream)

    task = asyncio.ensure_future(read())
    await asyncio.wait_for(about_to_read.wait(), TIMEOUT)
    assert not task.done(), "the reader got a slot: nothing was queued"
    return task


def one_slot() -> tuple[EchoEngine, DeltaStream]:
    """An engine with one slot and a request holding it."""
    engine = EchoEngine(context_length=64, slots=1)
    return engine, engine.generate(WORDS, GREEDY(max_tokens=8))


async def test_cancel_ends_a_queued_request_at_once() -> None:
    engine, holder = one_slot()
    await next_delta(holder, "the slot holder")
    task = await queued_reader(engine.generate(WORDS, GREEDY(max_tokens=8), request_id="queued"))
    assert (engine.stats.running, engine.stats.waiting) == (1, 1)
    assert engine.cancel("queued")
    with pytest.raises(RequestCancelledError, match="queued"):
        await asyncio.wait_for(task, TIMEOUT)
    assert (engine.stats.running, engine.stats.waiting, engine.stats.cancelled) == (1, 0, 1)
    assert (await collect(holder)).last.completion_tokens == 8
    # The slot went back: the next request runs at once.
    assert (await collect(engine.generate(WORDS, GREEDY(max_tokens=3)))).text == "one two three"


async def test_a_cancelled_reader_leaves_the_queue() -> None:
    engine, holder = one_slot()
    await next_delta(holder, "the slot holder")
    task = await queued_reader(engine.generate(WORDS, GREEDY(max_tokens=8)))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (engine.stats.running, engine.stats.waiting, engine.stats.cancelled) == (1, 0, 1)
    await collect(holder)
    assert (await collect(engine.generate(WORDS, GREEDY(max_tokens=2)))).text == "one two"
    assert (engine.stats.running, engine.stats.waiting) == (0, 0)


async def test_a_slot_handed_to_a_reader_cancelled_meanwhile_is_passed_on() -> None:
    """The holder ends (its slot goes to the queued reader) and, before that reader runs, its
    task is cancelled: the slot must not be lost with it."""
    engine, holder = one_slot()
    await next_delta(holder, "the slot holder")
    task = await queued_reader(engine.generate(WORDS, GREEDY(max_tokens=8)))
    third = engine.generate(WORDS, GREEDY(max_tokens=4))
    await holder.aclose()  # hands the slot over to the queued reader
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (await collect(third)).text == "one two three four"
    stats = engine.stats
    assert (stats.running, stats.waiting, stats.cancelled, stats.finished) == (0, 0, 2, 1)


async def test_close_ends_queued_and_running_requests() -> None:
    engine, holder = one_slot()
    await next_delta(holder, "the slot holder")
    task = await queued_reader(engine.generate(WORDS, GREEDY(max_tokens=8), request_id="queued"))
    engine.close()
    with pytest.raises(EngineClosedError, match="queued"):
        await asyncio.wait_for(task, TIMEOUT)
    with pytest.raises(EngineClosedError):
        await collect(holder)
    assert (engine.stats.running, engine.stats.waiting) == (0, 0)


async def test_aclose_of_a_queued_stream_stops_its_reader() -> None:
    engine, holder = one_slot()
    await next_delta(holder, "the slot holder")
    stream = engine.generate(WORDS, GREEDY(max_tokens=8))
    task = await queued_reader(stream)
    await stream.aclose()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(task, TIMEOUT)
    stats = engine.stats
    assert (stats.running, stats.waiting, stats.cancelled) == (1, 0, 1)
    await collect(holder)
    assert (await collect(engine.generate(WORDS, GREEDY(max_tokens=1)))).text == "one"


@pytest.mark.parametrize("stream", [True, False])
async def test_n_choices_are_the_same_echo_one_after_the_other(stream: bool) -> None:
    engine = EchoEngine(context_length=64)
    result = await collect(engine.generate(WORDS, GREEDY(max_tokens=3, n=3), stream=stream))
    texts: dict[int, str] = {}
    for d in result.deltas:
        texts[d.index] = texts.get(d.index, "") + d.text
    assert texts == {0: "one two three", 1: "one two three", 2: "one two three"}
    assert [(d.index, d.finish_reason) for d in result.deltas if d.finish_reason] == [
        (0, "length"),
        (1, "length"),
        (2, "length"),
    ]
    assert engine.stats.finished == 1 and engine.stats.running == 0


@pytest.mark.parametrize(
    "change",
    [{"logprobs": 2}, {"prompt_logprobs": 0}, {"constraint": Constraint("regex", "[a-z]+")}],
)
def test_what_needs_a_model_is_refused(change: dict[str, Any]) -> None:
    engine = EchoEngine(context_length=64)
    name = next(iter(change))
    with pytest.raises(InvalidRequestError, match=f"the echo engine has no model, so it cannot serve {name}"):
        engine.generate(WORDS, GREEDY(max_tokens=3, **change))
