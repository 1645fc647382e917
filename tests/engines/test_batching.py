"""BatchingEngine against a tiny random Llama: exactness, sharing, sampling, stops, cancellation,
failures. Every wait is bounded by ``asyncio.wait_for``; nothing sleeps to synchronise."""

from __future__ import annotations

import asyncio
import functools
import random
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from tests.support.engines import (
    GREEDY,
    TIMEOUT,
    Result,
    collect,
    next_delta,
    prompts_of,
    reference,
    split_stop,
)
from tests.support.models import tiny_llama_and_tokenizer
from workers.engines.batching import (
    BatchingEngine,
    Delta,
    EngineClosedError,
    RequestCancelledError,
    SamplingParams,
)
from workers.engines.detokenizer import IncrementalDetokenizer, StopMatcher


@pytest.fixture(scope="module")
def tiny() -> tuple[Any, Any]:
    return tiny_llama_and_tokenizer()


@pytest.fixture
def engine(tiny: tuple[Any, Any]) -> Iterator[BatchingEngine]:
    model, tokenizer = tiny
    eng = BatchingEngine(model, tokenizer, max_batch_size=16)
    eng.start()
    yield eng
    eng.close()


@pytest.fixture
def free_engine(tiny: tuple[Any, Any]) -> Iterator[BatchingEngine]:
    """EOS off: the random model sometimes emits it early, which would cut cases short."""
    model, tokenizer = tiny
    eng = BatchingEngine(model, tokenizer, max_batch_size=16, eos_token_ids=())
    eng.start()
    yield eng
    eng.close()


# ---------------------------------------------------------------- exactness


async def test_greedy_alone_matches_generate(tiny: tuple[Any, Any], engine: BatchingEngine) -> None:
    model, tokenizer = tiny
    for prompt in prompts_of(tokenizer, 3, seed=1):
        got = await collect(engine.generate(prompt, GREEDY(max_tokens=24)))
        expected = reference(model, prompt, 24, tokenizer.eos_token_id)
        assert got.ids == expected, f"prompt {prompt}"
        assert got.last.prompt_tokens == len(prompt)


async def test_greedy_batched_matches_generate(tiny: tuple[Any, Any], engine: BatchingEngine) -> None:
    """Different prompt lengths and budgets, joining a running batch at different times, must
    each give exactly what ``generate`` gives for the prompt alone: proves padding and KV merging."""
    model, tokenizer = tiny
    prompts = prompts_of(tokenizer, 8, seed=2)
    budgets = [30, 5, 17, 40, 9, 26, 12, 33]
    first = engine.generate(prompts[0], GREEDY(max_tokens=budgets[0]))
    head = [await next_delta(first, "the first request")]
    # The rest arrive while the first is running: newcomers shorter and longer than the batch.
    rest = [
        asyncio.ensure_future(collect(engine.generate(p, GREEDY(max_tokens=b))))
        for p, b in zip(prompts[1:], budgets[1:], strict=True)
    ]
    tail = await collect(first)
    results = [Result(head + tail.deltas), *await asyncio.gather(*rest)]
    for prompt, budget, got in zip(prompts, budgets, results, strict=True):
        assert got.ids == reference(model, prompt, budget, tokenizer.eos_token_id), (
            f"prompt of {len(prompt)} tokens, max_tokens {budget}"
        )


async def test_eager_attention_batched_matches_generate() -> None:
    """Same exactness through the generic path (transformers builds the masks), not the SDPA one."""
    model, tokenizer = tiny_llama_and_tokenizer(seed=1)
    model.set_attn_implementation("eager")
    eng = BatchingEngine(model, tokenizer, eos_token_ids=())
    eng.start()
    try:
        prompts = prompts_of(tokenizer, 4, seed=16)
        first = eng.generate(prompts[0], GREEDY(max_tokens=20))
        head = [await next_delta(first, "the first request")]
        rest = [asyncio.ensure_future(collect(eng.generate(p, GREEDY(max_tokens=12)))) for p in prompts[1:]]
        results = [Result(head + (await collect(first)).deltas), *await asyncio.gather(*rest)]
        assert eng.stats.forward_passes < 30, "the requests were not batched"
    finally:
        eng.close()
    for prompt, budget, got in zip(prompts, [20, 12, 12, 12], results, strict=True):
        assert got.ids == reference(model, prompt, budget, None)


async def test_waiting_queue_beyond_max_batch(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    eng = BatchingEngine(model, tokenizer, max_batch_size=2)
    eng.start()
    try:
        prompts = prompts_of(tokenizer, 5, seed=3)
        tasks = [
            asyncio.ensure_future(collect(eng.generate(p, GREEDY(max_tokens=6 + 3 * i))))
            for i, p in enumerate(prompts)
        ]
        first = await asyncio.wait_for(asyncio.shield(tasks[0]), TIMEOUT)
        assert first.ids
        results = await asyncio.gather(*tasks)
        for i, (prompt, got) in enumerate(zip(prompts, results, strict=True)):
            assert got.ids == reference(model, prompt, 6 + 3 * i, tokenizer.eos_token_id)
        stats = eng.stats
        assert (stats.running, stats.waiting, stats.finished, stats.cancelled) == (0, 0, 5, 0)
        assert stats.generated_tokens == sum(r.last.completion_tokens for r in results)
        assert stats.ttft_last_s is not None and stats.ttft_avg_s is not None
        assert 0 < stats.ttft_avg_s < TIMEOUT
    finally:
        eng.close()


# ---------------------------------------------------------------- batching


async def test_concurrent_requests_share_forward_passes(
    tiny: tuple[Any, Any], engine: BatchingEngine
) -> None:
    _, tokenizer = tiny
    prompts = prompts_of(tokenizer, 16, seed=4)
    budgets = [8 + (i * 5) % 33 for i in range(16)]
    before = engine.stats.forward_passes
    results = await asyncio.gather(
        *(collect(engine.generate(p, GREEDY(max_tokens=b))) for p, b in zip(prompts, budgets, strict=True))
    )
    passes = engine.stats.forward_passes - before
    total = sum(len(r.ids) for r in results)
    assert total >= 16 * 8
    # Alone, each token costs one forward. Together: one prefill per admission wave plus one
    # decode per step of the longest request.
    assert passes <= max(budgets) + 16, f"{passes} forwards for {total} tokens"
    assert passes * 4 < total, f"{passes} forwards for {total} tokens: not shared"


async def test_short_request_finishes_before_long_one(
    tiny: tuple[Any, Any], free_engine: BatchingEngine
) -> None:
    _, tokenizer = tiny
    long_prompt, short_prompt = prompts_of(tokenizer, 2, seed=5)
    seen_long: list[int] = []
    long_done = asyncio.Event()

    async def run_long() -> Result:
        res = Result()
        async for d in free_engine.generate(long_prompt, GREEDY(max_tokens=80)):
            res.deltas.append(d)
            seen_long.extend(d.token_ids)
        long_done.set()
        return res

    long_task = asyncio.ensure_future(run_long())
    short = await collect(free_engine.generate(short_prompt, GREEDY(max_tokens=4)))
    long_at_short_finish = len(seen_long)
    assert not long_done.is_set(), "the long request finished first"
    assert (short.last.finish_reason, short.last.completion_tokens) == ("length", 4)
    long = await asyncio.wait_for(long_task, TIMEOUT)
    assert long_at_short_finish < 80 // 2
    assert (long.last.finish_reason, len(long.ids)) == ("length", 80)


# ---------------------------------------------------------------- sampling


async def test_seed_reproducible_whatever_runs_alongside(
    tiny: tuple[Any, Any], engine: BatchingEngine
) -> None:
    _, tokenizer = tiny
    prompt, *others = prompts_of(tokenizer, 6, seed=6)
    params = SamplingParams(max_tokens=30, temperature=1.1, top_p=0.95, top_k=100, seed=1234)
    alone = await collect(engine.generate(prompt, params))

    # Again, but joining a busy batch of greedy and differently seeded sampling requests.
    mates = [
        SamplingParams(max_tokens=40, temperature=t, seed=s)
        for t, s in [(0.0, None), (0.7, 1), (1.5, 1234), (1.0, None), (0.0, 7)]
    ]
    streams = [engine.generate(p, m) for p, m in zip(others, mates, strict=True)]
    heads = [await next_delta(s, "a batch mate") for s in streams]
    assert all(heads)
    crowded = await collect(engine.generate(prompt, params))
    await asyncio.gather(*(collect(s) for s in streams))
    assert crowded.ids == alone.ids
    assert crowded.text == alone.text

    other_seed = await collect(engine.generate(prompt, SamplingParams(max_tokens=30, seed=99)))
    greedy = await collect(engine.generate(prompt, GREEDY(max_tokens=30)))
    assert other_seed.ids != alone.ids
    assert greedy.ids != alone.ids, "sampling looks greedy"


async def test_degenerate_sampling_equals_greedy(tiny: tuple[Any, Any], engine: BatchingEngine) -> None:
    _, tokenizer = tiny
    prompt = prompts_of(tokenizer, 1, seed=7)[0]
    greedy = await collect(engine.generate(prompt, GREEDY(max_tokens=20)))
    top1 = await collect(engine.generate(prompt, SamplingParams(max_tokens=20, top_k=1)))
    tiny_p = await collect(engine.generate(prompt, SamplingParams(max_tokens=20, top_p=1e-6)))
    assert top1.ids == greedy.ids
    assert tiny_p.ids == greedy.ids


# ---------------------------------------------------------------- stops and finish reasons


async def test_length_finish_and_counts(tiny: tuple[Any, Any], free_engine: BatchingEngine) -> None:
    _, tokenizer = tiny
    prompt = tokenizer("日本 café 🙂").input_ids
    got = await collect(free_engine.generate(prompt, GREEDY(max_tokens=25)))
    running_total = 0
    for d in got.deltas:
        running_total += len(d.token_ids)
        assert d.completion_tokens == running_total
        assert d.prompt_tokens == len(prompt)
    assert all(d.finish_reason is None for d in got.deltas[:-1])
    assert (got.last.finish_reason, got.last.completion_tokens) == ("length", 25)
    # Byte-level pieces were streamed without breaking a character, and add up exactly.
    assert any("\ufffd" in tokenizer.decode([t]) for t in got.ids)
    assert got.text == tokenizer.decode(got.ids, skip_special_tokens=True)


async def test_whole_text_reader_gets_the_first_token_then_the_rest(
    tiny: tuple[Any, Any], free_engine: BatchingEngine
) -> None:
    """stream=False: the first token goes over at once (time to first token), the others are
    held until the last and go over with it, the same tokens and text as a stream's."""
    _, tokenizer = tiny
    prompt = tokenizer("日本 café 🙂").input_ids
    streamed = await collect(free_engine.generate(prompt, GREEDY(max_tokens=25)))
    whole = await collect(free_engine.generate(prompt, GREEDY(max_tokens=25), stream=False))
    assert len(streamed.deltas) > 2
    assert [len(d.token_ids) for d in whole.deltas] == [1, 24]
    assert [d.completion_tokens for d in whole.deltas] == [1, 25]
    assert (whole.ids, whole.text) == (streamed.ids, streamed.text)
    assert whole.last.finish_reason == "length" and whole.deltas[0].finish_reason is None
    # A stop string ends it as it ends a stream; a one-token budget is one Delta.
    text, _ = split_stop(tokenizer, streamed.ids)
    stopped = await collect(free_engine.generate(prompt, GREEDY(max_tokens=25, stop=(text,)), stream=False))
    assert stopped.last.finish_reason == "stop" and text not in stopped.text
    one = await collect(free_engine.generate(prompt, GREEDY(max_tokens=1), stream=False))
    assert [len(d.token_ids) for d in one.deltas] == [1] and one.last.finish_reason == "length"


async def test_stop_token_ids(tiny: tuple[Any, Any], engine: BatchingEngine) -> None:
    _, tokenizer = tiny
    prompt = prompts_of(tokenizer, 1, seed=8)[0]
    free = await collect(engine.generate(prompt, GREEDY(max_tokens=30)))
    stop_id = free.ids[6]
    j = free.ids.index(stop_id)
    got = await collect(engine.generate(prompt, GREEDY(max_tokens=30, stop_token_ids=(stop_id,))))
    assert got.last.finish_reason == "stop"
    assert got.ids == free.ids[: j + 1]
    assert got.last.completion_tokens == j + 1
    assert got.text == tokenizer.decode(free.ids[:j], skip_special_tokens=True)


async def test_eos_from_generation_config(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    default = BatchingEngine(model, tokenizer)
    assert default.eos_token_ids == {tokenizer.eos_token_id}
    assert default.context_length == model.config.max_position_embeddings
    # An eos chosen from the model's own greedy output, so that it is really produced.
    prompt = prompts_of(tokenizer, 1, seed=9)[0]
    free = reference(model, prompt, 20, None)
    eos = free[4]
    eng = BatchingEngine(model, tokenizer, eos_token_ids=[eos])
    eng.start()
    try:
        got = await collect(eng.generate(prompt, GREEDY(max_tokens=20)))
    finally:
        eng.close()
    j = free.index(eos)
    assert (got.last.finish_reason, got.ids) == ("stop", free[: j + 1])
    assert got.text == tokenizer.decode(free[:j], skip_special_tokens=True)


async def test_stop_string_split_across_tokens(tiny: tuple[Any, Any], free_engine: BatchingEngine) -> None:
    _, tokenizer = tiny
    prompt = tokenizer("the people write water").input_ids
    free = await collect(free_engine.generate(prompt, GREEDY(max_tokens=40)))
    stop, n_tokens = split_stop(tokenizer, free.ids)
    full = tokenizer.decode(free.ids, skip_special_tokens=True)
    got = await collect(free_engine.generate(prompt, GREEDY(max_tokens=40, stop=("zzz-never", stop))))
    assert got.last.finish_reason == "stop"
    assert got.text == full[: full.index(stop)]
    assert stop not in got.text
    assert got.ids == free.ids[:n_tokens]
    assert got.last.completion_tokens == n_tokens


async def test_stop_string_on_last_token_still_stop(
    tiny: tuple[Any, Any], free_engine: BatchingEngine
) -> None:
    """A stop string completed by the max_tokens-th token is a "stop", not a "length"."""
    _, tokenizer = tiny
    prompt = tokenizer("the people write water").input_ids
    free = await collect(free_engine.generate(prompt, GREEDY(max_tokens=40)))
    stop, n_tokens = split_stop(tokenizer, free.ids)
    got = await collect(free_engine.generate(prompt, GREEDY(max_tokens=n_tokens, stop=(stop,))))
    assert (got.last.finish_reason, got.last.completion_tokens) == ("stop", n_tokens)
    # One token less: the stop string never completes, the withheld prefix comes out at the end.
    short = await collect(free_engine.generate(prompt, GREEDY(max_tokens=n_tokens - 1, stop=(stop,))))
    assert short.last.finish_reason == "length"
    assert short.text == tokenizer.decode(free.ids[: n_tokens - 1], skip_special_tokens=True)


def test_stop_matcher_withholds_possible_prefixes() -> None:
    m = StopMatcher(["</end>", "STOP"])
    assert m.feed("hello <") == ("hello ", False)
    assert m.feed("/e") == ("", False)
    assert m.feed("x and S") == ("</ex and ", False)
    assert m.feed("TO") == ("", False)
    assert m.feed("P tail") == ("", True)
    m = StopMatcher(["abc"])
    assert m.feed("xxab") == ("xx", False)
    assert m.feed("", final=True) == ("ab", False)


class _SlowTokenizer:
    """Only ``decode``: what a tokenizer without a Rust backend offers the detokenizer."""

    def __init__(self, fast: Any) -> None:
        self._fast = fast

    def decode(self, ids: list[int], **kwargs: Any) -> str:
        return str(self._fast.decode(ids, **kwargs))


@pytest.mark.parametrize("backend", ["rust-stream", "python"])
def test_incremental_detokenizer_never_splits_characters(tiny: tuple[Any, Any], backend: str) -> None:
    _, fast = tiny
    tokenizer = fast if backend == "rust-stream" else _SlowTokenizer(fast)
    text = "日本 東京 straße 🙂🚀 déjà ½ привет"
    ids = fast(text).input_ids
    assert any("\ufffd" in fast.decode([t]) for t in ids), "no token splits a character"
    detok = IncrementalDetokenizer(tokenizer, fast("hi").input_ids)
    chunks = [detok.step(t) for t in ids]
    chunks.append(detok.flush())
    assert all("\ufffd" not in c for c in chunks), chunks
    assert "".join(chunks) == text

    # Arbitrary ids (invalid UTF-8 included): the stream still adds up to the full decode.
    rng = random.Random(0)
    ids = [rng.randrange(3, len(fast)) for _ in range(300)]
    detok = IncrementalDetokenizer(tokenizer, [])
    streamed = "".join(detok.step(t) for t in ids) + detok.flush()
    assert streamed == fast.decode(ids, skip_special_tokens=True)


# ---------------------------------------------------------------- cancellation


async def _steps_until(engine: BatchingEngine, clock: AsyncIterator[Delta], cond: Any) -> int:
    """Iterate ``clock`` (a running request: one Delta per engine step at most) until
    ``cond(stats)`` holds; returns how many Deltas it took."""
    for n in range(1, 50):
        await next_delta(clock, "the clock request")
        if cond(engine.stats):
            return n
    pytest.fail(f"condition not reached within 50 steps; stats {engine.stats}")


async def test_break_cancels_and_frees_the_slot(tiny: tuple[Any, Any], free_engine: BatchingEngine) -> None:
    _, tokenizer = tiny
    long_prompt, clock_prompt = prompts_of(tokenizer, 2, seed=10)
    seen = 0
    async for d in free_engine.generate(long_prompt, GREEDY(max_tokens=400)):
        seen += len(d.token_ids)
        if seen >= 3:
            break
    # Another request submitted meanwhile serves as the clock and must complete.
    clock = free_engine.generate(clock_prompt, GREEDY(max_tokens=60))
    n = await _steps_until(free_engine, clock, lambda s: s.cancelled == 1 and s.running == 1)
    assert n <= 3, f"slot freed only after {n} steps"
    rest = await collect(clock)
    assert rest.last.finish_reason is not None
    stats = free_engine.stats
    assert (stats.running, stats.waiting, stats.cancelled) == (0, 0, 1)
    # Tokens produced for the abandoned request after the break: at most a step or two.
    assert stats.generated_tokens - seen - rest.last.completion_tokens <= 5


async def test_task_cancel_cancels_request(tiny: tuple[Any, Any], free_engine: BatchingEngine) -> None:
    _, tokenizer = tiny
    p1, p2 = prompts_of(tokenizer, 2, seed=11)
    started = asyncio.Event()

    async def consume() -> None:
        async for _ in free_engine.generate(p1, GREEDY(max_tokens=400)):
            started.set()

    task = asyncio.ensure_future(consume())
    await asyncio.wait_for(started.wait(), TIMEOUT)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    clock = free_engine.generate(p2, GREEDY(max_tokens=60))
    await _steps_until(free_engine, clock, lambda s: s.cancelled == 1 and s.running == 1)
    await collect(clock)


async def test_cancel_by_id(tiny: tuple[Any, Any], free_engine: BatchingEngine) -> None:
    _, tokenizer = tiny
    p1, p2 = prompts_of(tokenizer, 2, seed=12)
    stream = free_engine.generate(p1, GREEDY(max_tokens=400), request_id="victim")
    await next_delta(stream, "the victim")
    other = asyncio.ensure_future(collect(free_engine.generate(p2, GREEDY(max_tokens=10))))
    assert free_engine.cancel("victim") is True
    with pytest.raises(RequestCancelledError, match="victim"):
        await collect(stream)
    assert free_engine.cancel("victim") is False
    assert free_engine.cancel("no-such-request") is False
    assert (await asyncio.wait_for(other, TIMEOUT)).last.finish_reason is not None
    assert free_engine.stats.cancelled == 1


async def test_cancel_waiting_request(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    eng = BatchingEngine(model, tokenizer, max_batch_size=1, eos_token_ids=())
    eng.start()
    try:
        p1, p2 = prompts_of(tokenizer, 2, seed=13)
        first = eng.generate(p1, GREEDY(max_tokens=30))
        await next_delta(first, "the running request")
        queued = eng.generate(p2, GREEDY(max_tokens=30), request_id="queued")
        queued_task = asyncio.ensure_future(collect(queued))
        # The running request is the clock: the queued one is seen waiting, then cancelled.
        await _steps_until(eng, first, lambda s: s.waiting == 1)
        assert eng.cancel("queued")
        with pytest.raises(RequestCancelledError):
            await asyncio.wait_for(queued_task, TIMEOUT)
        assert eng.stats.waiting == 0
        assert (await collect(first)).last.finish_reason is not None
    finally:
        eng.close()


async def test_duplicate_request_id_rejected(tiny: tuple[Any, Any], free_engine: BatchingEngine) -> None:
    _, tokenizer = tiny
    p = prompts_of(tokenizer, 1)[0]
    first = free_engine.generate(p, GREEDY(max_tokens=50), request_id="dup")
    await next_delta(first, "the first 'dup'")
    with pytest.raises(ValueError, match="dup"):
        await anext(free_engine.generate(p, GREEDY(max_tokens=5), request_id="dup"))
    await first.aclose()


# ---------------------------------------------------------------- validation and failures


@pytest.mark.parametrize(
    ("prompt_len", "kwargs", "needle"),
    [
        (5, {"max_tokens": 0}, "max_tokens must be positive, got 0"),
        (5, {"max_tokens": -3}, "got -3"),
        (5, {"max_tokens": 4, "temperature": -0.5}, "temperature must be >= 0, got -0.5"),
        (5, {"max_tokens": 4, "top_p": 0.0}, "top_p"),
        (5, {"max_tokens": 4, "top_k": -1}, "top_k"),
        (500, {"max_tokens": 13}, "500 tokens \\+ max_tokens 13 = 513 exceeds the context length 512"),
        (0, {"max_tokens": 4}, "empty"),
    ],
)
def test_bad_values_raise(
    tiny: tuple[Any, Any], prompt_len: int, kwargs: dict[str, Any], needle: str
) -> None:
    model, tokenizer = tiny
    eng = BatchingEngine(model, tokenizer)
    with pytest.raises(ValueError, match=needle):
        eng.generate([5] * prompt_len, SamplingParams(**kwargs))


def test_out_of_vocab_prompt_rejected(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    eng = BatchingEngine(model, tokenizer)
    with pytest.raises(ValueError, match=str(len(tokenizer) + 5)):
        eng.generate([1, 2, len(tokenizer) + 5], SamplingParams(max_tokens=3))


async def test_failing_request_does_not_stop_the_engine(
    tiny: tuple[Any, Any], engine: BatchingEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, tokenizer = tiny
    good = prompts_of(tokenizer, 3, seed=14)
    poison = [7, 7, 7, 7, 7, 7, 7]  # a prompt the wrapped model refuses to prefill
    original = model.forward
    fail_next_decode = False

    @functools.wraps(original)
    def forward(*args: Any, **kwargs: Any) -> Any:
        nonlocal fail_next_decode
        ids = kwargs["input_ids"]
        if ids.shape[1] > 1 and any(row[-7:].tolist() == poison for row in ids):
            raise RuntimeError("poisoned prompt")
        if ids.shape[1] == 1 and fail_next_decode:
            fail_next_decode = False
            raise RuntimeError("decode blew up")
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "forward", forward)
    results = await asyncio.gather(
        collect(engine.generate(poison, GREEDY(max_tokens=8))),
        *(collect(engine.generate(p, GREEDY(max_tokens=12))) for p in good),
        return_exceptions=True,
    )
    assert isinstance(results[0], RuntimeError) and "poisoned prompt" in str(results[0])
    for p, r in zip(good, results[1:], strict=True):
        assert isinstance(r, Result), r
        assert r.ids == reference(model, p, 12, tokenizer.eos_token_id)

    # A failing decode step ends the requests in that batch, and only them.
    a = engine.generate(good[0], GREEDY(max_tokens=30))
    await next_delta(a, "request a")
    fail_next_decode = True
    with pytest.raises(RuntimeError, match="decode blew up"):
        await collect(a)
    after = await collect(engine.generate(good[1], GREEDY(max_tokens=12)))
    assert after.ids == reference(model, good[1], 12, tokenizer.eos_token_id)
    assert engine.stats.running == 0


async def test_close_ends_pending_requests(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    eng = BatchingEngine(model, tokenizer, eos_token_ids=())
    p = prompts_of(tokenizer, 1)[0]
    with pytest.raises(EngineClosedError, match="start"):
        await anext(eng.generate(p, GREEDY(max_tokens=5)))
    eng.start()
    stream = eng.generate(p, GREEDY(max_tokens=400))
    await next_delta(stream, "the request")
    await asyncio.to_thread(eng.close)
    with pytest.raises(EngineClosedError):
        await collect(stream)
    with pytest.raises(EngineClosedError):
        await anext(eng.generate(p, GREEDY(max_tokens=5)))


async def test_serves_several_event_loops(tiny: tuple[Any, Any], engine: BatchingEngine) -> None:
    model, tokenizer = tiny
    p1, p2 = prompts_of(tokenizer, 2, seed=15)

    def in_other_loop() -> Result:
        return asyncio.run(collect(engine.generate(p2, GREEDY(max_tokens=15))))

    here, there = await asyncio.gather(
        collect(engine.generate(p1, GREEDY(max_tokens=15))), asyncio.to_thread(in_other_loop)
    )
    assert here.ids == reference(model, p1, 15, tokenizer.eos_token_id)
    assert there.ids == reference(model, p2, 15, tokenizer.eos_token_id)


def test_count_tokens(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    eng = BatchingEngine(model, tokenizer)
    assert eng.count_tokens("water café") == len(tokenizer("water café").input_ids)
    assert eng.stats.forward_passes == 0
