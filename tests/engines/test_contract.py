"""The ``Engine`` contract (workers/engines/api.py), held against every LLM engine: the batching
engine and the static engine over a tiny random Llama, the llama.cpp engine over SmolLM2's GGUF
file (its expected text from llama.cpp's own ``Llama``), and the model-less echo.

The engines differ in what they generate, not in the contract: each case knows its prompts and
its greedy completion of a prompt (transformers' own ``generate`` for a model, the prompt's first
words for the echo), and every test below runs unchanged against all three. Eos is off for the
model engines so that the random model's completions run to their ``max_tokens``.

Every wait is bounded by ``asyncio.wait_for``; nothing sleeps to synchronise.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import random
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.engines import GREEDY, TIMEOUT, collect, next_delta, prompts_of, reference
from tests.support.models import tiny_llama_and_tokenizer
from workers.engines import BatchingEngine, EchoEngine, StaticBatchingEngine
from workers.engines.api import (
    Delta,
    DeltaStream,
    Engine,
    EngineClosedError,
    EngineStats,
    RequestCancelledError,
    SamplingParams,
)

MAX_SEQ = 192  # the static engine's positions per slot (the tiny model's context is 512)
ECHO_CONTEXT = 512
_ECHO_WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi".split()


@dataclass
class Case:
    """One engine under the contract: how to build it and what it should generate."""

    name: str
    # (max_batch_size or None for the engine's default) -> a new, not yet started engine
    build: Callable[[int | None], Engine]
    prompts: Callable[[int, int], list[list[Any]]]  # (how many, seed) -> prompts of different lengths
    filler: Callable[[int], list[Any]]  # n -> a prompt of n tokens
    expected: Callable[[Sequence[Any], int], str]  # (prompt, max_tokens) -> the greedy completion
    has_ids: bool  # whether Deltas carry the generated token ids


@pytest.fixture(scope="module")
def tiny() -> tuple[Any, Any]:
    return tiny_llama_and_tokenizer()


def _model_case(name: str, tiny: tuple[Any, Any]) -> Case:
    model, tokenizer = tiny
    cache: dict[tuple[tuple[int, ...], int], str] = {}

    def build(max_batch_size: int | None) -> Engine:
        batch = max_batch_size or 16
        if name == "static":
            return StaticBatchingEngine(
                model, tokenizer, max_batch_size=batch, max_seq_len=MAX_SEQ, eos_token_ids=()
            )
        return BatchingEngine(model, tokenizer, max_batch_size=batch, eos_token_ids=())

    def expected(prompt: Sequence[Any], max_tokens: int) -> str:
        key = (tuple(prompt), max_tokens)
        if key not in cache:
            ids = reference(model, prompt, max_tokens, None)
            cache[key] = tokenizer.decode(ids, skip_special_tokens=True)
        return cache[key]

    return Case(
        name=name,
        build=build,
        prompts=lambda n, seed: prompts_of(tokenizer, n, seed),
        filler=lambda n: [5] * n,
        expected=expected,
        has_ids=True,
    )


def _echo_prompts(n: int, seed: int) -> list[list[Any]]:
    """Words enough for any budget below (so a completion ends by its length), of different
    lengths."""
    rng = random.Random(seed)
    return [[rng.choice(_ECHO_WORDS) for _ in range(45 + (i * 7) % 23)] for i in range(n)]


def _echo_case() -> Case:
    def build(max_batch_size: int | None) -> Engine:
        # A batch size is the echo's ``slots``: requests beyond it wait, as in a model's batch.
        return EchoEngine(context_length=ECHO_CONTEXT, slots=max_batch_size)

    return Case(
        name="echo",
        build=build,
        prompts=_echo_prompts,
        filler=lambda n: ["w"] * n,
        expected=lambda prompt, max_tokens: " ".join(prompt[:max_tokens]),
        has_ids=False,
    )


@pytest.fixture(scope="module")
def gguf(smollm2_gguf: Path) -> Iterator[tuple[Any, Any, Any]]:
    """SmolLM2's GGUF loaded for the engine, its tokenizer, and llama.cpp's own ``Llama``."""
    from llama_cpp import Llama

    from workers.engines.llama_vocab import GGUFTokenizer
    from workers.loading import ModelSource, load_gguf

    loaded = load_gguf(ModelSource(path=smollm2_gguf, origin="uri"), quantization="Q4_1")
    llm = Llama(str(smollm2_gguf), n_ctx=ECHO_CONTEXT, verbose=False)
    yield loaded, GGUFTokenizer(loaded.llama_cpp, loaded.vocab, loaded.metadata), llm
    llm.close()
    loaded.unload()


_SENTENCES = [
    "The history of the café on the corner began in 1921, when a baker from Lyon opened it",
    "Once upon a time in a small village by the sea there lived an old fisherman and his cat",
    "To make a good bread you need flour, water, salt and yeast, and above all a little patience",
    "In the summer of 1969 the first people walked on the Moon while millions watched on television",
    "Über den Wolken muss die Freiheit wohl grenzenlos sein, sang Reinhard Mey in einem Lied",
]


def _llama_cpp_case(gguf: tuple[Any, Any, Any]) -> Case:
    from workers.engines import LlamaCppEngine

    loaded, tokenizer, llm = gguf
    cache: dict[tuple[tuple[int, ...], int], str] = {}

    def build(max_batch_size: int | None) -> Engine:
        return LlamaCppEngine(
            loaded.llama_cpp,
            loaded.model,
            tokenizer,
            max_batch_size=max_batch_size or 16,
            context_length=ECHO_CONTEXT,
            eos_token_ids=(),
        )

    def expected(prompt: Sequence[Any], max_tokens: int) -> str:
        key = (tuple(prompt), max_tokens)
        if key not in cache:
            # Llama.generate does not stop at end-of-generation either.
            ids = list(itertools.islice(llm.generate(list(prompt), temp=0.0, reset=True), max_tokens))
            cache[key] = tokenizer.decode(ids)
        return cache[key]

    def prompts(n: int, seed: int) -> list[list[Any]]:
        # A real model repeats itself on random words: the beginnings of real sentences, cut at
        # different lengths.
        rng = random.Random(seed)
        out = []
        for i in range(n):
            words = rng.choice(_SENTENCES).split()
            out.append(tokenizer.encode(" ".join(words[: 2 + (i * 5) % (len(words) - 1)])))
        return out

    return Case(
        name="llama.cpp",
        build=build,
        prompts=prompts,
        filler=lambda n: [5] * n,
        expected=expected,
        has_ids=True,
    )


@pytest.fixture(params=["batching", "static", "echo", "llama.cpp"])
def case(request: pytest.FixtureRequest, tiny: tuple[Any, Any]) -> Case:
    name = request.param
    if name == "llama.cpp":
        return _llama_cpp_case(request.getfixturevalue("gguf"))
    return _echo_case() if name == "echo" else _model_case(name, tiny)


@pytest.fixture
def make(case: Case) -> Iterator[Callable[..., Engine]]:
    """Builds and starts engines of the case; closes them all at the end of the test."""
    built: list[Engine] = []

    def _make(max_batch_size: int | None = None) -> Engine:
        engine = case.build(max_batch_size)
        built.append(engine)
        engine.start()
        return engine

    yield _make
    for engine in built:
        engine.close()


@pytest.fixture
def engine(make: Callable[..., Engine]) -> Engine:
    return make()


async def _first(stream_of: Callable[[], DeltaStream]) -> Delta:
    """The first Delta of a new stream: the engine may refuse the request at ``generate`` or at
    the stream's first read."""
    return await asyncio.wait_for(anext(stream_of()), TIMEOUT)


async def _until(
    engine: Engine, clock: AsyncIterator[Delta], cond: Callable[[EngineStats], bool]
) -> list[Delta]:
    """Reads ``clock`` (a running request: one Delta per step at most) until ``cond(stats)``;
    the Deltas it read."""
    read: list[Delta] = []
    for _ in range(40):
        read.append(await next_delta(clock, "the clock request"))
        if cond(engine.stats):
            return read
    pytest.fail(f"condition not reached within 40 steps; stats {engine.stats}")


def _stop_inside(text: str) -> tuple[str, int]:
    """A 3-character stop string first found at ``k`` in ``text``, right after a non-blank."""
    for k in range(len(text) // 3, len(text) - 3):
        stop = text[k : k + 3]
        if not text[k - 1].isspace() and not stop.isspace() and text.find(stop) == k:
            return stop, k
    raise AssertionError(f"no place for a stop string in {text!r}")


# ---------------------------------------------------------------- shape of the API


async def test_satisfies_the_engine_protocol(case: Case, engine: Engine) -> None:
    assert isinstance(engine, Engine)
    s = engine.stats
    assert (s.running, s.waiting, s.finished, s.cancelled, s.generated_tokens) == (0, 0, 0, 0, 0)
    assert engine.context_length > 0
    assert engine.count_tokens("water café") == len(engine.encode("water café", add_special_tokens=False))
    stream = engine.generate(case.prompts(1, 0)[0], GREEDY(max_tokens=3), request_id="shape")
    assert isinstance(stream, DeltaStream) and stream.request_id == "shape"
    assert (await collect(stream)).last.completion_tokens == 3


# ---------------------------------------------------------------- what comes out


async def test_stream_adds_up_to_the_completion(case: Case, engine: Engine) -> None:
    prompt = case.prompts(3, 1)[2]
    got = await collect(engine.generate(prompt, GREEDY(max_tokens=20), request_id="r-1"))
    assert got.text == case.expected(prompt, 20)
    assert all(d.finish_reason is None for d in got.deltas[:-1])
    assert (got.last.finish_reason, got.last.completion_tokens) == ("length", 20)
    assert all(d.prompt_tokens == len(prompt) for d in got.deltas)
    counts = [d.completion_tokens for d in got.deltas]
    assert counts == sorted(counts) and len(got.deltas) > 1
    if case.has_ids:
        assert len(got.ids) == 20
        running = 0
        for d in got.deltas:
            running += len(d.token_ids)
            assert d.completion_tokens == running


async def test_whole_reply_is_the_same_completion(case: Case, engine: Engine) -> None:
    """stream=False may hand the text over in fewer Deltas; text and counts are the same."""
    prompt = case.prompts(2, 2)[1]
    streamed = await collect(engine.generate(prompt, GREEDY(max_tokens=25)))
    whole = await collect(engine.generate(prompt, GREEDY(max_tokens=25), stream=False))
    assert whole.text == streamed.text == case.expected(prompt, 25)
    assert (whole.last.finish_reason, whole.last.completion_tokens) == ("length", 25)
    assert all(d.finish_reason is None for d in whole.deltas[:-1])
    assert len(whole.deltas) <= len(streamed.deltas)
    assert whole.ids == streamed.ids


async def test_one_token_budget(case: Case, engine: Engine) -> None:
    prompt = case.prompts(1, 3)[0]
    for stream in (True, False):
        got = await collect(engine.generate(prompt, GREEDY(max_tokens=1), stream=stream))
        assert len(got.deltas) == 1
        assert (got.last.finish_reason, got.last.completion_tokens, got.text) == (
            "length",
            1,
            case.expected(prompt, 1),
        )


async def test_stop_string_ends_the_completion_before_it(case: Case, engine: Engine) -> None:
    prompt = case.prompts(2, 4)[1]
    full = case.expected(prompt, 30)
    stop, at = _stop_inside(full)
    for stream in (True, False):
        params = GREEDY(max_tokens=30, stop=("zzz-never", stop))
        got = await collect(engine.generate(prompt, params, stream=stream))
        assert got.last.finish_reason == "stop", stop
        assert got.text == full[:at]
        assert stop not in got.text
        assert got.last.completion_tokens <= 30


async def test_seed_gives_the_same_completion(case: Case, engine: Engine) -> None:
    prompt = case.prompts(1, 5)[0]
    params = SamplingParams(max_tokens=20, temperature=1.1, top_p=0.95, top_k=100, seed=1234)
    first = await collect(engine.generate(prompt, params))
    again = await collect(engine.generate(prompt, params))
    assert (again.text, again.ids) == (first.text, first.ids)
    assert again.last.completion_tokens == 20


async def test_concurrent_requests_each_get_their_own_completion(case: Case, engine: Engine) -> None:
    prompts = case.prompts(8, 6)
    budgets = [30, 5, 17, 40, 9, 26, 12, 33]
    results = await asyncio.gather(
        *(collect(engine.generate(p, GREEDY(max_tokens=b))) for p, b in zip(prompts, budgets, strict=True))
    )
    for prompt, budget, got in zip(prompts, budgets, results, strict=True):
        assert got.text == case.expected(prompt, budget), f"{len(prompt)} prompt tokens, max_tokens {budget}"
        assert (got.last.finish_reason, got.last.completion_tokens) == ("length", budget)
    stats = engine.stats
    assert (stats.running, stats.waiting, stats.finished, stats.cancelled) == (0, 0, 8, 0)
    assert stats.generated_tokens == sum(budgets)
    assert stats.ttft_last_s is not None and stats.ttft_avg_s is not None
    assert 0 < stats.ttft_avg_s < TIMEOUT


async def test_requests_beyond_the_batch_wait_their_turn(case: Case, make: Callable[..., Engine]) -> None:
    engine = make(max_batch_size=2)
    assert engine.max_batch_size == 2
    prompts = case.prompts(5, 7)
    budgets = [6 + 3 * i for i in range(5)]
    results = await asyncio.gather(
        *(collect(engine.generate(p, GREEDY(max_tokens=b))) for p, b in zip(prompts, budgets, strict=True))
    )
    for prompt, budget, got in zip(prompts, budgets, results, strict=True):
        assert got.text == case.expected(prompt, budget)
    stats = engine.stats
    assert (stats.running, stats.waiting, stats.finished, stats.cancelled) == (0, 0, 5, 0)
    assert stats.generated_tokens == sum(budgets)


# ---------------------------------------------------------------- ending a request early


async def test_cancel_by_id(case: Case, engine: Engine) -> None:
    p1, p2 = case.prompts(2, 8)
    victim = engine.generate(p1, GREEDY(max_tokens=40), request_id="victim")
    await next_delta(victim, "the victim")
    other = asyncio.ensure_future(collect(engine.generate(p2, GREEDY(max_tokens=10))))
    assert engine.cancel("victim") is True
    with pytest.raises(RequestCancelledError, match="victim"):
        await collect(victim)
    assert engine.cancel("victim") is False
    assert engine.cancel("no-such-request") is False
    assert (await asyncio.wait_for(other, TIMEOUT)).text == case.expected(p2, 10)
    stats = engine.stats
    assert (stats.running, stats.waiting, stats.cancelled, stats.finished) == (0, 0, 1, 1)


async def test_cancel_a_waiting_request(case: Case, make: Callable[..., Engine]) -> None:
    engine = make(max_batch_size=1)
    p1, p2 = case.prompts(2, 9)
    first = engine.generate(p1, GREEDY(max_tokens=30))
    head = [await next_delta(first, "the running request")]
    queued = asyncio.ensure_future(collect(engine.generate(p2, GREEDY(max_tokens=30), request_id="queued")))
    # The running request is the clock: the queued one is seen waiting, then cancelled.
    head += await _until(engine, first, lambda s: s.waiting == 1)
    assert engine.cancel("queued")
    with pytest.raises(RequestCancelledError, match="queued"):
        await asyncio.wait_for(queued, TIMEOUT)
    rest = await collect(first)
    assert "".join(d.text for d in head) + rest.text == case.expected(p1, 30)
    stats = engine.stats
    assert (stats.running, stats.waiting, stats.cancelled, stats.finished) == (0, 0, 1, 1)


async def test_aclose_ends_the_request(case: Case, engine: Engine) -> None:
    p1, p2 = case.prompts(2, 10)
    stream = engine.generate(p1, GREEDY(max_tokens=40))
    await next_delta(stream, "the abandoned request")
    await stream.aclose()
    with pytest.raises(StopAsyncIteration):
        await anext(stream)
    clock = engine.generate(p2, GREEDY(max_tokens=40))
    await _until(engine, clock, lambda s: s.cancelled == 1 and s.running == 1)
    await collect(clock)
    stats = engine.stats
    assert (stats.running, stats.waiting, stats.cancelled) == (0, 0, 1)


async def test_cancelled_reader_ends_the_request(case: Case, engine: Engine) -> None:
    """A reader that holds its stream as the replica does (closing it on the way out) and is
    cancelled between two Deltas."""
    p1, p2 = case.prompts(2, 11)
    started, never = asyncio.Event(), asyncio.Event()

    async def consume() -> None:
        async with contextlib.aclosing(engine.generate(p1, GREEDY(max_tokens=40))) as stream:
            async for _ in stream:
                started.set()
                await never.wait()

    task = asyncio.ensure_future(consume())
    await asyncio.wait_for(started.wait(), TIMEOUT)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    clock = engine.generate(p2, GREEDY(max_tokens=40))
    await _until(engine, clock, lambda s: s.cancelled == 1 and s.running == 1)
    await collect(clock)
    assert engine.stats.running == 0


async def test_close_ends_pending_requests_and_refuses_new_ones(case: Case, engine: Engine) -> None:
    prompt = case.prompts(1, 12)[0]
    stream = engine.generate(prompt, GREEDY(max_tokens=40))
    await next_delta(stream, "the request")
    await asyncio.to_thread(engine.close)
    with pytest.raises(EngineClosedError):
        await collect(stream)
    with pytest.raises(EngineClosedError):
        await _first(lambda: engine.generate(prompt, GREEDY(max_tokens=5)))
    assert engine.stats.running == 0


async def test_duplicate_request_id_rejected(case: Case, engine: Engine) -> None:
    prompt = case.prompts(1, 13)[0]
    first = engine.generate(prompt, GREEDY(max_tokens=40), request_id="dup")
    await next_delta(first, "the first 'dup'")
    with pytest.raises(ValueError, match="dup"):
        await _first(lambda: engine.generate(prompt, GREEDY(max_tokens=5), request_id="dup"))
    await first.aclose()


# ---------------------------------------------------------------- checks of the values


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"max_tokens": 0}, "max_tokens must be positive, got 0"),
        ({"max_tokens": -3}, "max_tokens must be positive, got -3"),
        ({"max_tokens": 4, "temperature": -0.5}, "temperature must be >= 0, got -0.5"),
        ({"max_tokens": 4, "temperature": math.nan}, "temperature must be >= 0, got nan"),
        ({"max_tokens": 4, "top_p": 0.0}, "top_p must be in \\(0, 1\\], got 0.0"),
        ({"max_tokens": 4, "top_p": 1.5}, "top_p must be in \\(0, 1\\], got 1.5"),
        ({"max_tokens": 4, "top_k": -1}, "top_k must be >= 0 \\(0 turns it off\\), got -1"),
    ],
)
def test_bad_values_are_refused_naming_them(
    case: Case, engine: Engine, kwargs: dict[str, Any], needle: str
) -> None:
    with pytest.raises(ValueError, match=needle):
        engine.generate(case.filler(5), SamplingParams(**kwargs))


def test_too_long_a_request_is_refused_naming_its_sizes(case: Case, engine: Engine) -> None:
    limit = engine.context_length
    n = limit - 5
    with pytest.raises(ValueError, match=f"prompt of {n} tokens \\+ max_tokens 13 = {n + 13} exceeds"):
        engine.generate(case.filler(n), SamplingParams(max_tokens=13))
    engine.generate(case.filler(n), SamplingParams(max_tokens=5))  # fits exactly


def test_params_must_be_sampling_params(case: Case, engine: Engine) -> None:
    with pytest.raises(TypeError, match="SamplingParams, got dict"):
        engine.generate(case.filler(3), {"max_tokens": 3})  # type: ignore[arg-type]
