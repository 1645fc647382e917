"""StaticBatchingEngine against a tiny random Llama on the CPU: exactness against ``generate``
through slots, buckets, queueing and compaction; the static cache and mask; the decode step being
capturable; and, on a CUDA machine only, captured graphs against eager steps.

Helpers come from tests/support/engines.py: the engine keeps BatchingEngine's semantics, so the same
checks apply. Every wait is bounded by ``asyncio.wait_for``; nothing sleeps to synchronise."""

from __future__ import annotations

import asyncio
import functools
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

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
from workers.engines.api import RequestCancelledError, SamplingParams
from workers.engines.kv_slots import SlotCache, SlotLayer
from workers.engines.runner import BucketRunners
from workers.engines.static import StaticBatchingEngine, default_buckets

MAX_SEQ = 192  # the tiny model's context is 512; a shorter cache keeps each step cheap


@pytest.fixture(scope="module")
def tiny() -> tuple[Any, Any]:
    return tiny_llama_and_tokenizer()


def _engine(tiny: tuple[Any, Any], **kwargs: Any) -> StaticBatchingEngine:
    model, tokenizer = tiny
    options: dict[str, Any] = {"max_batch_size": 16, "max_seq_len": MAX_SEQ, **kwargs}
    return StaticBatchingEngine(model, tokenizer, **options)


@pytest.fixture
def engine(tiny: tuple[Any, Any]) -> Iterator[StaticBatchingEngine]:
    eng = _engine(tiny)
    eng.start()
    yield eng
    eng.close()


@pytest.fixture
def free_engine(tiny: tuple[Any, Any]) -> Iterator[StaticBatchingEngine]:
    """EOS off: the random model sometimes emits it early, which would cut cases short."""
    eng = _engine(tiny, eos_token_ids=())
    eng.start()
    yield eng
    eng.close()


async def staggered(
    engine: StaticBatchingEngine, prompts: Sequence[list[int]], budgets: Sequence[int]
) -> list[Result]:
    """The first request runs a step, then the rest join the running batch together."""
    first = engine.generate(prompts[0], GREEDY(max_tokens=budgets[0]))
    head = [await next_delta(first, "the first request")]
    rest = [
        asyncio.ensure_future(collect(engine.generate(p, GREEDY(max_tokens=b))))
        for p, b in zip(prompts[1:], budgets[1:], strict=True)
    ]
    tail = await collect(first)
    return [Result(head + tail.deltas), *await asyncio.gather(*rest)]


# ---------------------------------------------------------------- exactness


async def test_greedy_alone_matches_generate(tiny: tuple[Any, Any], engine: StaticBatchingEngine) -> None:
    model, tokenizer = tiny
    for prompt in prompts_of(tokenizer, 3, seed=1):
        got = await collect(engine.generate(prompt, GREEDY(max_tokens=24)))
        assert got.ids == reference(model, prompt, 24, tokenizer.eos_token_id), f"prompt {prompt}"
        assert got.last.prompt_tokens == len(prompt)
    assert set(engine.bucket_steps) == {1}


async def test_greedy_batched_matches_generate(tiny: tuple[Any, Any], engine: StaticBatchingEngine) -> None:
    """Prompts of different lengths joining a running batch, different budgets (rows leave at
    different steps, so survivors are moved into freed slots): each equals ``generate`` alone."""
    model, tokenizer = tiny
    prompts = prompts_of(tokenizer, 8, seed=2)
    budgets = [30, 5, 17, 40, 9, 26, 12, 33]
    results = await staggered(engine, prompts, budgets)
    for prompt, budget, got in zip(prompts, budgets, results, strict=True):
        assert got.ids == reference(model, prompt, budget, tokenizer.eos_token_id), (
            f"prompt of {len(prompt)} tokens, max_tokens {budget}"
        )
    assert len(engine.bucket_steps) > 2, engine.bucket_steps


async def test_more_requests_than_slots_queue(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    eng = _engine(tiny, max_batch_size=2)
    eng.start()
    try:
        prompts = prompts_of(tokenizer, 5, seed=3)
        tasks = [
            asyncio.ensure_future(collect(eng.generate(p, GREEDY(max_tokens=6 + 3 * i))))
            for i, p in enumerate(prompts)
        ]
        results = await asyncio.gather(*tasks)
        for i, (prompt, got) in enumerate(zip(prompts, results, strict=True)):
            assert got.ids == reference(model, prompt, 6 + 3 * i, tokenizer.eos_token_id)
        stats = eng.stats
        assert (stats.running, stats.waiting, stats.finished, stats.cancelled) == (0, 0, 5, 0)
        assert stats.generated_tokens == sum(r.last.completion_tokens for r in results)
        assert set(eng.bucket_steps) <= {1, 2}
    finally:
        eng.close()


async def test_bucket_changes_keep_outputs_exact(tiny: tuple[Any, Any]) -> None:
    """3 running requests decode in bucket 4; 5 more arrive and the batch moves to bucket 8;
    as they finish one by one it shrinks through 4, 2 and 1."""
    model, tokenizer = tiny
    eng = _engine(tiny, max_batch_size=8, eos_token_ids=())
    eng.start()
    try:
        prompts = prompts_of(tokenizer, 8, seed=17)
        budgets = [36, 30, 41, 8, 20, 14, 27, 11]
        early = [eng.generate(p, GREEDY(max_tokens=b)) for p, b in zip(prompts[:3], budgets[:3], strict=True)]
        heads = [[await next_delta(s, "an early request")] for s in early]
        # One more step each, so that several bucket-4 steps have surely run.
        for s, h in zip(early, heads, strict=True):
            h.append(await next_delta(s, "an early request"))
        assert eng.bucket_steps.get(4, 0) >= 1 and 8 not in eng.bucket_steps
        late = [
            asyncio.ensure_future(collect(eng.generate(p, GREEDY(max_tokens=b))))
            for p, b in zip(prompts[3:], budgets[3:], strict=True)
        ]
        tails = await asyncio.gather(*(collect(s) for s in early))
        results = [Result(h + t.deltas) for h, t in zip(heads, tails, strict=True)]
        results += await asyncio.gather(*late)
    finally:
        eng.close()
    for prompt, budget, got in zip(prompts, budgets, results, strict=True):
        assert got.ids == reference(model, prompt, budget, None), f"max_tokens {budget}"
    steps = eng.bucket_steps
    assert {4, 8} <= set(steps), steps
    assert set(steps) <= set(default_buckets(8))


async def test_eager_attention_additive_mask_matches_generate() -> None:
    """Eager attention adds the mask to the scores: the engine hands it a float mask instead."""
    model, tokenizer = tiny_llama_and_tokenizer(seed=1)
    model.set_attn_implementation("eager")
    eng = StaticBatchingEngine(model, tokenizer, max_batch_size=4, max_seq_len=96, eos_token_ids=())
    _poison(eng)
    eng.start()
    try:
        prompts = prompts_of(tokenizer, 4, seed=16)
        results = await staggered(eng, prompts, [20, 12, 7, 15])
    finally:
        eng.close()
    for prompt, budget, got in zip(prompts, [20, 12, 7, 15], results, strict=True):
        assert got.ids == reference(model, prompt, budget, None)


def _poison(eng: StaticBatchingEngine) -> None:
    """Large finite garbage everywhere in the static cache: only a mask that really hides every
    position a row does not own keeps the outputs exact."""
    gen = torch.Generator().manual_seed(0)
    for layer in eng.kv_cache.layers:
        for t in (layer.keys, layer.values):
            t.copy_(torch.randn(t.shape, generator=gen, dtype=t.dtype) * 50)


async def test_mask_hides_stale_and_foreign_positions(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    eng = _engine(tiny, max_batch_size=4, eos_token_ids=())
    _poison(eng)
    eng.start()
    try:
        prompts = prompts_of(tokenizer, 6, seed=18)
        budgets = [25, 9, 31, 4, 18, 12]
        results = await staggered(eng, prompts, budgets)
    finally:
        eng.close()
    for prompt, budget, got in zip(prompts, budgets, results, strict=True):
        assert got.ids == reference(model, prompt, budget, None)


# ---------------------------------------------------------------- static cache and steps


def test_slot_layer_writes_each_row_at_its_own_position() -> None:
    slots, heads, length, dim = 5, 2, 8, 3
    keys = torch.zeros(slots, heads, length, dim)
    values = torch.zeros(slots, heads, length, dim)
    cache = SlotCache([SlotLayer(keys, values)])
    positions = torch.tensor([[3], [0], [7]])
    k_new = torch.arange(3 * heads * dim, dtype=torch.float32).view(3, heads, 1, dim) + 1
    v_new = -k_new
    cache.begin_step(positions)
    k_all, v_all = cache.update(k_new, v_new, 0)
    # The full static K/V of the step's rows, as views of the one allocation.
    assert k_all.shape == (3, heads, length, dim) and k_all.data_ptr() == keys.data_ptr()
    assert v_all.data_ptr() == values.data_ptr()
    expected = torch.zeros_like(keys)
    for row, pos in enumerate([3, 0, 7]):
        expected[row, :, pos] = k_new[row, :, 0]
    assert torch.equal(keys, expected)
    assert torch.equal(values, -expected)
    with pytest.raises(RuntimeError, match="one-token"):
        cache.update(torch.zeros(1, heads, 2, dim), torch.zeros(1, heads, 2, dim), 0)


def test_cache_geometry_and_limits(tiny: tuple[Any, Any]) -> None:
    model, _ = tiny
    eng = _engine(tiny, max_batch_size=6, max_seq_len=100)
    config = model.config
    assert eng.context_length == eng.max_seq == 100
    assert eng.model_context_length == config.max_position_embeddings
    head_dim = config.hidden_size // config.num_attention_heads
    layers = eng.kv_cache.layers
    assert len(layers) == config.num_hidden_layers
    # Length rounded up to 16 for the SDPA kernels; one allocation for the engine's lifetime.
    assert layers[0].keys.shape == (6, config.num_key_value_heads, 112, head_dim)
    assert layers[0].keys.dtype == model.dtype
    assert eng.buckets == (1, 2, 4, 6)
    # A max_seq_len beyond the model's context is capped by it.
    assert _engine(tiny, max_seq_len=10_000).context_length == config.max_position_embeddings
    custom = StaticBatchingEngine(model, tiny[1], max_batch_size=300, max_seq_len=16, buckets=[3, 64, 999])
    assert custom.buckets == (3, 64, 300)


@pytest.mark.parametrize(
    ("prompt_len", "max_tokens", "needle"),
    [
        (100, 29, "prompt of 100 tokens \\+ max_tokens 29 = 129 exceeds the static KV cache of 128 "),
        (128, 1, "128 tokens \\+ max_tokens 1 = 129 .*max_seq_len 128, model context 512"),
    ],
)
def test_request_beyond_max_seq_rejected(
    tiny: tuple[Any, Any], prompt_len: int, max_tokens: int, needle: str
) -> None:
    eng = _engine(tiny, max_seq_len=128)
    with pytest.raises(ValueError, match=needle):
        eng.generate([5] * prompt_len, SamplingParams(max_tokens=max_tokens))
    eng.generate([5] * 100, SamplingParams(max_tokens=28))  # fits exactly
    # The other checks are BatchingEngine's.
    with pytest.raises(ValueError, match="max_tokens must be positive"):
        eng.generate([5] * 4, SamplingParams(max_tokens=0))


def test_unsupported_setups_rejected(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="CUDA"):
        StaticBatchingEngine(model, tokenizer, use_graphs=True)
    model.config.sliding_window = 64
    try:
        with pytest.raises(ValueError, match="sliding-window"):
            StaticBatchingEngine(model, tokenizer, max_seq_len=128)
        # A window at least as long as the cache is full attention.
        assert StaticBatchingEngine(model, tokenizer, max_seq_len=64).max_seq == 64
    finally:
        model.config.sliding_window = None


async def test_runner_per_bucket_built_once_and_reused(
    tiny: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, tokenizer = tiny
    eng = _engine(tiny, max_batch_size=8, eos_token_ids=())
    builds: Counter[int] = Counter()
    build = BucketRunners.build

    def counting(self: BucketRunners, bucket: int) -> Any:
        builds[bucket] += 1
        return build(self, bucket)

    monkeypatch.setattr(BucketRunners, "build", counting)
    eng.start()
    try:
        prompts = prompts_of(tokenizer, 6, seed=19)
        budgets = [12, 5, 9, 3, 7, 10]
        await staggered(eng, prompts, budgets)
        first_runners = dict(eng.runners)
        assert set(first_runners) == set(eng.bucket_steps), "a runner for every bucket used, no other"
        assert all(n == 1 for n in builds.values()), builds
        assert {r.kind for r in first_runners.values()} == {"eager"}  # no CUDA here
        assert {b: r.calls for b, r in first_runners.items()} == dict(eng.bucket_steps)
        await staggered(eng, prompts, budgets)  # the same buckets again
        assert all(n == 1 for n in builds.values()), builds
        assert all(eng.runners[b] is r for b, r in first_runners.items())
    finally:
        eng.close()


def test_capture_at_start_builds_every_bucket(tiny: tuple[Any, Any]) -> None:
    eng = _engine(tiny, max_batch_size=8, capture_at_start=True)
    assert not eng.runners
    eng.start()
    try:
        assert sorted(eng.runners) == [1, 2, 4, 8]
        assert all(r.calls == 0 for r in eng.runners.values())
    finally:
        eng.close()


class _OpLog(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def test_decode_step_is_capturable(tiny: tuple[Any, Any]) -> None:
    """What CUDA graph capture forbids, checked on the CPU: no value may travel to the host
    (FakeTensorMode raises on any data-dependent read) and no host data may be turned into a
    tensor inside the step (that would be a host-to-device copy baked into the graph)."""
    model, _ = tiny
    eng = _engine(tiny, max_batch_size=4, max_seq_len=64)
    with torch.inference_mode():
        with FakeTensorMode(allow_non_fake_inputs=True):
            with pytest.raises(DataDependentOutputException):  # the check does catch a sync
                (torch.ones(2) + 1).sum().item()
            logits, tokens = eng.decode_step(4)
        assert logits.shape == (4, model.config.vocab_size) and tokens.shape == (4,)

        control = _OpLog()
        with control:
            torch.tensor([1, 2])
        assert control.ops["lift_fresh"] == 1
        log = _OpLog()
        with log:
            eng.decode_step(4)
    forbidden = {"lift_fresh", "_local_scalar_dense", "nonzero", "masked_select", "item"}
    assert not forbidden & set(log.ops), log.ops
    assert log.ops["scatter_"] == 2 * model.config.num_hidden_layers  # K and V of every layer


async def test_concurrent_requests_share_forward_passes(
    tiny: tuple[Any, Any], engine: StaticBatchingEngine
) -> None:
    _, tokenizer = tiny
    prompts = prompts_of(tokenizer, 16, seed=4)
    budgets = [8 + (i * 5) % 33 for i in range(16)]
    before = engine.stats.forward_passes
    steps_before = sum(engine.bucket_steps.values())
    results = await asyncio.gather(
        *(collect(engine.generate(p, GREEDY(max_tokens=b))) for p, b in zip(prompts, budgets, strict=True))
    )
    passes = engine.stats.forward_passes - before
    total = sum(len(r.ids) for r in results)
    assert total >= 16 * 8
    assert passes <= max(budgets) + 16, f"{passes} forwards for {total} tokens"
    assert passes * 4 < total, f"{passes} forwards for {total} tokens: not shared"
    # Every decode forward is one bucketed step.
    assert sum(engine.bucket_steps.values()) - steps_before <= passes


# ---------------------------------------------------------------- sampling


async def test_seed_reproducible_whatever_runs_alongside(
    tiny: tuple[Any, Any], engine: StaticBatchingEngine
) -> None:
    _, tokenizer = tiny
    prompt, *others = prompts_of(tokenizer, 6, seed=6)
    params = SamplingParams(max_tokens=30, temperature=1.1, top_p=0.95, top_k=100, seed=1234)
    alone = await collect(engine.generate(prompt, params))
    mates = [
        SamplingParams(max_tokens=40, temperature=t, seed=s)
        for t, s in [(0.0, None), (0.7, 1), (1.5, 1234), (1.0, None), (0.0, 7)]
    ]
    streams = [engine.generate(p, m) for p, m in zip(others, mates, strict=True)]
    assert all([await next_delta(s, "a batch mate") for s in streams])
    crowded = await collect(engine.generate(prompt, params))
    await asyncio.gather(*(collect(s) for s in streams))
    assert crowded.ids == alone.ids
    assert crowded.text == alone.text

    other_seed = await collect(engine.generate(prompt, SamplingParams(max_tokens=30, seed=99)))
    greedy = await collect(engine.generate(prompt, GREEDY(max_tokens=30)))
    top1 = await collect(engine.generate(prompt, SamplingParams(max_tokens=30, top_k=1)))
    assert other_seed.ids != alone.ids
    assert greedy.ids != alone.ids, "sampling looks greedy"
    assert top1.ids == greedy.ids


# ---------------------------------------------------------------- stops and finish reasons


async def test_length_finish_and_counts(tiny: tuple[Any, Any], free_engine: StaticBatchingEngine) -> None:
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
    assert got.text == tokenizer.decode(got.ids, skip_special_tokens=True)


async def test_stop_token_ids(tiny: tuple[Any, Any], engine: StaticBatchingEngine) -> None:
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


async def test_stop_strings(tiny: tuple[Any, Any], free_engine: StaticBatchingEngine) -> None:
    _, tokenizer = tiny
    prompt = tokenizer("the people write water").input_ids
    free = await collect(free_engine.generate(prompt, GREEDY(max_tokens=40)))
    stop, n_tokens = split_stop(tokenizer, free.ids)
    full = tokenizer.decode(free.ids, skip_special_tokens=True)
    got = await collect(free_engine.generate(prompt, GREEDY(max_tokens=40, stop=("zzz-never", stop))))
    assert (got.last.finish_reason, got.last.completion_tokens) == ("stop", n_tokens)
    assert got.text == full[: full.index(stop)]
    assert got.ids == free.ids[:n_tokens]
    # Completed by the last allowed token: still "stop"; one token less: "length", nothing lost.
    last = await collect(free_engine.generate(prompt, GREEDY(max_tokens=n_tokens, stop=(stop,))))
    assert (last.last.finish_reason, last.last.completion_tokens) == ("stop", n_tokens)
    short = await collect(free_engine.generate(prompt, GREEDY(max_tokens=n_tokens - 1, stop=(stop,))))
    assert short.last.finish_reason == "length"
    assert short.text == tokenizer.decode(free.ids[: n_tokens - 1], skip_special_tokens=True)


# ---------------------------------------------------------------- cancellation and failures


async def test_cancel_frees_a_slot_for_the_next_request(tiny: tuple[Any, Any]) -> None:
    """Two slots: cancelling the request in slot 0 moves the other one into it, and the queued
    third request takes the freed slot; both then continue exactly as ``generate``."""
    model, tokenizer = tiny
    eng = _engine(tiny, max_batch_size=2, eos_token_ids=())
    eng.start()
    try:
        p_victim, p_mate, p_next = prompts_of(tokenizer, 3, seed=20)
        victim = eng.generate(p_victim, GREEDY(max_tokens=150), request_id="victim")
        await next_delta(victim, "the victim")
        mate = eng.generate(p_mate, GREEDY(max_tokens=60))
        mate_ids: list[int] = []
        queued: asyncio.Future[Result] | None = None
        for _ in range(50):  # the mate is the clock: one Delta per step at most
            mate_ids += (await next_delta(mate, "the mate")).token_ids
            if queued is None:
                queued = asyncio.ensure_future(collect(eng.generate(p_next, GREEDY(max_tokens=25))))
            elif eng.stats.waiting == 1:
                break
        assert queued is not None
        assert (eng.stats.running, eng.stats.waiting) == (2, 1)
        assert eng.cancel("victim")
        with pytest.raises(RequestCancelledError, match="victim"):
            await collect(victim)
        mate_ids += (await collect(mate)).ids
        nxt = await asyncio.wait_for(queued, TIMEOUT)
        stats = eng.stats
        assert (stats.running, stats.waiting, stats.cancelled) == (0, 0, 1)
    finally:
        eng.close()
    assert nxt.ids == reference(model, p_next, 25, None)
    # The mate moved from slot 1 to slot 0 mid-way: its whole output must still be exact.
    assert mate_ids == reference(model, p_mate, 60, None)


async def test_break_cancels_and_frees_the_slot(
    tiny: tuple[Any, Any], free_engine: StaticBatchingEngine
) -> None:
    model, tokenizer = tiny
    long_prompt, clock_prompt = prompts_of(tokenizer, 2, seed=10)
    seen = 0
    async for d in free_engine.generate(long_prompt, GREEDY(max_tokens=150)):
        seen += len(d.token_ids)
        if seen >= 3:
            break
    clock = free_engine.generate(clock_prompt, GREEDY(max_tokens=60))
    head = [await next_delta(clock, "the clock request")]
    for _ in range(3):
        if free_engine.stats.cancelled == 1 and free_engine.stats.running == 1:
            break
        head.append(await next_delta(clock, "the clock request"))
    assert (free_engine.stats.cancelled, free_engine.stats.running) == (1, 1)
    rest = await collect(clock)
    assert [t for d in head for t in d.token_ids] + rest.ids == reference(model, clock_prompt, 60, None)


async def test_failing_decode_step_ends_the_batch_only(
    tiny: tuple[Any, Any], engine: StaticBatchingEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, tokenizer = tiny
    good = prompts_of(tokenizer, 2, seed=14)
    original = model.forward
    fail_next_decode = False

    @functools.wraps(original)
    def forward(*args: Any, **kwargs: Any) -> Any:
        nonlocal fail_next_decode
        if kwargs["input_ids"].shape[1] == 1 and fail_next_decode:
            fail_next_decode = False
            raise RuntimeError("decode blew up")
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "forward", forward)
    step = engine.decode_step
    lean = step.lean
    if lean is not None:  # the lean step decodes without the model's forward (llama_step.py)

        def lean_step(*args: Any) -> Any:
            nonlocal fail_next_decode
            if fail_next_decode:
                fail_next_decode = False
                raise RuntimeError("decode blew up")
            return lean(*args)

        monkeypatch.setattr(step, "lean", lean_step)
    a = engine.generate(good[0], GREEDY(max_tokens=30))
    await next_delta(a, "request a")
    fail_next_decode = True
    with pytest.raises(RuntimeError, match="decode blew up"):
        await collect(a)
    after = await collect(engine.generate(good[1], GREEDY(max_tokens=12)))
    assert after.ids == reference(model, good[1], 12, tokenizer.eos_token_id)
    assert engine.stats.running == 0


# ---------------------------------------------------------------- CUDA graphs (GPU machines only)


def _reference_on_device(model: Any, prompt: list[int], max_tokens: int) -> list[int]:
    with torch.inference_mode():
        ids = torch.tensor([prompt], device=model.device)
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_tokens,
            min_new_tokens=max_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=2,
        )
    return list(out[0, len(prompt) :].tolist())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="captures CUDA graphs: needs a CUDA device")
@pytest.mark.parametrize("capture_at_start", [False, True])
async def test_cuda_graphs_match_eager_steps_and_generate(capture_at_start: bool) -> None:
    model, tokenizer = tiny_llama_and_tokenizer()
    model.to("cuda")  # fp32: eager steps, graphs and generate agree token for token
    prompts = prompts_of(tokenizer, 7, seed=21)
    budgets = [33, 6, 21, 40, 12, 27, 9]
    sampled = SamplingParams(max_tokens=20, temperature=0.9, top_p=0.9, seed=5)
    outputs: dict[str, list[list[int]]] = {}
    kinds: dict[str, set[str]] = {}
    for name, graphs in (("graphs", True), ("eager", False)):
        eng = StaticBatchingEngine(
            model,
            tokenizer,
            max_batch_size=8,
            max_seq_len=96,
            eos_token_ids=(),
            use_graphs=graphs,
            capture_at_start=capture_at_start and graphs,
        )
        eng.start()
        try:
            results = await staggered(eng, prompts, budgets)
            # The graphs' logits feed the per-row sampler too.
            seeded = await collect(eng.generate(prompts[1], sampled))
            kinds[name] = {r.kind for r in eng.runners.values()}
        finally:
            eng.close()
        outputs[name] = [r.ids for r in results] + [seeded.ids]
    assert kinds == {"graphs": {"cuda-graph"}, "eager": {"eager"}}
    assert outputs["graphs"] == outputs["eager"]
    for prompt, budget, ids in zip(prompts, budgets, outputs["graphs"][:-1], strict=True):
        assert ids == _reference_on_device(model, prompt, budget)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="captures CUDA graphs: needs a CUDA device")
def test_cuda_runners_are_graphs() -> None:
    model, tokenizer = tiny_llama_and_tokenizer()
    model.to("cuda")
    eng = StaticBatchingEngine(model, tokenizer, max_batch_size=4, max_seq_len=64, capture_at_start=True)
    eng.start()
    try:
        assert {b: r.kind for b, r in eng.runners.items()} == dict.fromkeys([1, 2, 4], "cuda-graph")
        assert eng.kv_cache.layers[0].keys.is_cuda
    finally:
        eng.close()
