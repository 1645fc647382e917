"""Unit tests of the torch-free parts of the LLM engine, each alone: the scheduler (admission
within the batch and the prefill budget, cancels, submission errors) and the output processor
(finish reasons, stops, readers of the whole text), the latter with a one-character-per-token
stand-in tokenizer. The engines built from these parts are tests/engines/test_contract.py."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from workers.engines.api import (
    MAX_LOGPROBS,
    Constraint,
    EngineClosedError,
    SamplingParams,
    TokenLogprob,
    check_sampling,
)
from workers.engines.bridge import Mailbox, Outbox
from workers.engines.output import OutputProcessor
from workers.engines.request import Request, choice_seed
from workers.engines.scheduler import Scheduler

EOS = 0


class _CharTokenizer:
    """Token ``i`` is the character ``chr(ord('a') + i - 1)``; 0 is the eos (decodes to "")."""

    def decode(self, ids: list[int], **_: Any) -> str:
        return "".join(chr(ord("a") + i - 1) for i in ids if i)


def _request(rid: str, prompt_len: int = 3, *, whole: bool = False, **params: Any) -> Request:
    mailbox = Mailbox(asyncio.get_running_loop())
    sampling = SamplingParams(**{"max_tokens": 8, "temperature": 0, **params})
    return Request(rid, [1] * prompt_len, sampling, mailbox, frozenset({EOS}), whole)


def _scheduler(max_batch_size: int = 4, budget: int = 10) -> Scheduler:
    scheduler = Scheduler(max_batch_size, budget, engine_name="TestEngine")
    assert scheduler.open()
    return scheduler


# ---------------------------------------------------------------- scheduler


async def test_admission_fills_the_batch_shortest_first_in_budgeted_chunks() -> None:
    scheduler = _scheduler(max_batch_size=5, budget=10)
    for rid, length in [("a", 5), ("b", 3), ("c", 3), ("d", 3), ("e", 4), ("f", 1)]:
        scheduler.submit(_request(rid, length))
    assert scheduler.counts() == (0, 6)
    assert scheduler.wait_for_work()
    chunks = scheduler.schedule()
    # Five fit in the batch, in arrival order; sorted by length; 3 x 3 tokens fit the budget of
    # 10 padded tokens, a fourth row of 4 would not.
    assert [[r.id for r in chunk] for chunk in chunks] == [["b", "c", "d"], ["e", "a"]]
    assert [r.id for r in scheduler.waiting] == ["f"]
    scheduler.running.extend(r for chunk in chunks for r in chunk)
    assert scheduler.schedule() == []  # the batch is full
    assert scheduler.counts() == (5, 1)


async def test_a_prompt_beyond_the_budget_is_prefilled_alone() -> None:
    scheduler = _scheduler(budget=4)
    for rid, length in [("long", 9), ("x", 2), ("y", 2)]:
        scheduler.submit(_request(rid, length))
    scheduler.wait_for_work()
    assert [[r.id for r in c] for c in scheduler.schedule()] == [["x", "y"], ["long"]]


async def test_cancels_end_waiting_and_running_requests_once() -> None:
    scheduler = _scheduler()
    running, waiting, walked_away = _request("run"), _request("wait"), _request("gone")
    for req in (running, waiting, walked_away):
        scheduler.submit(req)
    scheduler.wait_for_work()
    scheduler.waiting.remove(running)
    scheduler.running.append(running)
    assert scheduler.cancel(running, notify=True)
    assert scheduler.cancel(running, notify=True)  # twice before the step: ended once
    assert scheduler.cancel(waiting, notify=True)
    assert scheduler.cancel(walked_away, notify=False)
    ended = scheduler.take_cancels()
    assert sorted((r.id, tell) for r, tell in ended) == [("gone", False), ("run", True), ("wait", True)]
    assert scheduler.cancelled == 3 and not scheduler.waiting
    # Running rows are only marked: the KV layout drops them.
    assert scheduler.running == [running] and running.done
    assert scheduler.find("run") is None
    assert not scheduler.cancel(running, notify=True) and scheduler.take_cancels() == []


async def test_submission_errors_name_what_is_wrong() -> None:
    scheduler = Scheduler(2, 100, engine_name="TestEngine")
    with pytest.raises(EngineClosedError, match=r"not started; call TestEngine\.start\(\)"):
        scheduler.submit(_request("early"))
    assert scheduler.open() and not scheduler.open()
    scheduler.submit(_request("dup"))
    with pytest.raises(ValueError, match="request_id 'dup' is already in use"):
        scheduler.submit(_request("dup"))
    scheduler.close()
    assert not scheduler.wait_for_work()
    with pytest.raises(EngineClosedError, match="closed"):
        scheduler.submit(_request("late"))
    with pytest.raises(EngineClosedError, match="cannot be restarted"):
        scheduler.open()
    assert [r.id for r in scheduler.drain()] == ["dup"]
    with pytest.raises(ValueError, match="max_batch_size must be positive, got 0"):
        Scheduler(0, 100, engine_name="TestEngine")


async def test_a_request_of_n_choices_is_admitted_as_n_rows_at_once() -> None:
    scheduler = _scheduler(max_batch_size=4, budget=100)
    wide = _request("wide", n=3)
    for _ in range(2):
        wide.add_choice()
    assert [c.index for c in wide.group] == [0, 1, 2] and all(c.queue is wide.queue for c in wide.group)
    scheduler.submit(_request("one"))
    scheduler.submit(wide)
    scheduler.submit(_request("two"))
    assert scheduler.wait_for_work()
    chunks = scheduler.schedule()
    # "one" and the three rows of "wide" fill the 4 rows; "two" waits, behind it.
    assert sorted(r.id for chunk in chunks for r in chunk) == ["one", "wide"]
    assert [r.id for r in scheduler.waiting] == ["two"]
    scheduler.running.extend(c for chunk in chunks for r in chunk for c in r.group)
    # One choice ending does not release the id; cancelling ends the others, once.
    wide.group[1].done = True
    scheduler.release(wide.group[1])
    assert scheduler.find("wide") is wide
    assert scheduler.cancel(wide.group[2], notify=True)
    assert scheduler.take_cancels() == [(wide, True)]
    assert all(c.done for c in wide.group) and scheduler.find("wide") is None
    assert not scheduler.cancel(wide, notify=True)


async def test_a_request_for_prompt_logprobs_is_prefilled_alone() -> None:
    scheduler = _scheduler(max_batch_size=4, budget=100)
    requests: list[tuple[str, dict[str, Any]]] = [("a", {}), ("b", {"prompt_logprobs": 1}), ("c", {})]
    for rid, extra in requests:
        scheduler.submit(_request(rid, **extra))
    assert scheduler.wait_for_work()
    assert sorted([r.id for r in chunk] for chunk in scheduler.schedule()) == [["a", "c"], ["b"]]


def test_choice_seeds_differ_and_the_first_is_the_seed() -> None:
    seeds = [choice_seed(7, i) for i in range(16)]
    assert seeds[0] == 7 and len(set(seeds)) == 16
    assert seeds == [choice_seed(7, i) for i in range(16)]
    assert choice_seed(8, 1) != seeds[1]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"n": 0}, "n must be in 1..16, got 0"),
        ({"n": 17}, "n must be in 1..16, got 17"),
        ({"logprobs": MAX_LOGPROBS + 1}, "logprobs must be in 0..20 or None, got 21"),
        ({"prompt_logprobs": -1}, "prompt_logprobs must be in 0..20 or None, got -1"),
        ({"presence_penalty": 2.5}, r"presence_penalty must be in \[-2, 2\], got 2.5"),
        ({"frequency_penalty": float("nan")}, r"frequency_penalty must be in \[-2, 2\], got nan"),
        ({"repetition_penalty": 0.0}, r"repetition_penalty must be in \(0, 100\], got 0.0"),
        ({"min_p": 1.5}, r"min_p must be in \[0, 1\], got 1.5"),
        ({"logit_bias": ((5, 101.0),)}, r"logit_bias\[5\] must be in \[-100, 100\], got 101.0"),
        ({"logit_bias": ((-1, 1.0),)}, "logit_bias token id must be a non-negative int, got -1"),
        ({"logit_bias": ((True, 1.0),)}, "logit_bias token id must be a non-negative int, got True"),
        ({"constraint": Constraint("yaml", "x")}, "constraint kind must be one of .*, got 'yaml'"),  # type: ignore[arg-type]
    ],
)
def test_sampling_checks_name_the_value(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_sampling(SamplingParams(max_tokens=4, **change))


def test_sampling_defaults_pass() -> None:
    check_sampling(SamplingParams(max_tokens=4))
    check_sampling(
        SamplingParams(
            max_tokens=4,
            n=16,
            logprobs=20,
            prompt_logprobs=0,
            presence_penalty=-2,
            frequency_penalty=2,
            repetition_penalty=1.3,
            min_p=1,
            logit_bias=((0, -100), (3, 100.0)),
            constraint=Constraint("choice", ("a", "b")),
        )
    )


# ---------------------------------------------------------------- output processing


class _Harness:
    def __init__(self) -> None:
        self.outbox = Outbox()
        self.released: list[str] = []
        self.output = OutputProcessor(_CharTokenizer(), self.outbox, lambda r: self.released.append(r.id))

    def pieces(self, req: Request, *, full: bool = False) -> list[Any]:
        """What the step sent ``req``'s reader (drained here, on the reader's loop): ids, text,
        finish reason, completion tokens, and with ``full`` the choice index and logprobs."""
        assert self.outbox.flush() == []
        req.mailbox.drain()
        out = []
        while not req.queue.empty():
            item = req.queue.get_nowait()
            out.append(item if full or isinstance(item, BaseException) else item[:4])
        return out


async def test_length_finish_and_counts() -> None:
    h = _Harness()
    req = _request("r", max_tokens=3)
    assert [h.output.advance(req, t) for t in (1, 2, 3)] == [False, False, True]
    assert h.pieces(req) == [([1], "a", None, 1), ([2], "b", None, 2), ([3], "c", "length", 3)]
    assert req.done and h.released == ["r"] and (h.output.finished, h.output.generated) == (1, 3)


async def test_eos_and_stop_ids_stop_without_their_text() -> None:
    h = _Harness()
    req = _request("r", stop_token_ids=(9,))
    assert not h.output.advance(req, 1)
    assert h.output.advance(req, 9)
    assert h.pieces(req) == [([1], "a", None, 1), ([9], "", "stop", 2)]
    eos = _request("e")
    assert h.output.advance(eos, EOS)
    assert h.pieces(eos) == [([EOS], "", "stop", 1)]


async def test_stop_string_across_tokens_is_held_back_then_cut() -> None:
    h = _Harness()
    req = _request("r", stop=("bc",))
    assert [h.output.advance(req, t) for t in (1, 2, 3)] == [False, False, True]
    # "b" could start the stop string, so it waits; "bc" completes it and nothing of it is sent.
    assert h.pieces(req) == [([1], "a", None, 1), ([2], "", None, 2), ([3], "", "stop", 3)]


async def test_a_whole_text_reader_gets_the_first_token_then_the_rest_at_once() -> None:
    h = _Harness()
    req = _request("r", max_tokens=4, whole=True)
    assert [h.output.advance(req, t) for t in (1, 2, 3, 4)] == [False, False, False, True]
    assert h.pieces(req) == [([1], "a", None, 1), ([2, 3, 4], "bcd", "length", 4)]


async def test_pieces_carry_the_choice_index_and_the_logprobs() -> None:
    h = _Harness()
    req = _request("r", max_tokens=3, whole=True, logprobs=1, n=2)
    second = req.add_choice()
    lps = [TokenLogprob(t, -0.5 * t, [(t, -0.5 * t)]) for t in (1, 2, 3)]
    assert [h.output.advance(second, t, lp) for t, lp in zip((1, 2, 3), lps, strict=True)] == [
        False,
        False,
        True,
    ]
    # The whole-text reader's held pieces keep their logprobs, in order, beside their ids.
    assert h.pieces(second, full=True) == [
        ([1], "a", None, 1, 1, [lps[0]], None),
        ([2, 3], "bc", "length", 3, 1, lps[1:], None),
    ]
    # The first piece of a request whose prompt logprobs were computed carries them, once.
    req.prompt_lps = [None, TokenLogprob(1, -1.0, [])]
    h.output.advance(req, 1, lps[0])
    h.output.advance(req, 2, lps[1])
    h.output.advance(req, 3, lps[2])
    assert [p[6] for p in h.pieces(req, full=True)] == [[None, TokenLogprob(1, -1.0, [])], None]


async def test_a_failed_request_gets_its_own_copy_of_the_error() -> None:
    h = _Harness()
    a, b = _request("a"), _request("b")
    exc = RuntimeError("decode blew up")
    h.output.fail([a, b, a], exc)
    (got_a,), (got_b,) = h.pieces(a), h.pieces(b)
    assert str(got_a) == str(got_b) == "decode blew up" and got_a is not got_b is not exc
    assert h.output.finished == 2 and h.released == ["a", "b"]
