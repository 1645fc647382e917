"""The CPU runner: the static engine decoding eagerly over KV slots that start short and grow with
the longest row, attention reading only the window of positions in use, against transformers'
own greedy ``generate`` for the same weights and dtype (the tiny random Llama, and SmolLM2-135M
in fp32 and bf16). Every wait is bounded (``collect``); nothing sleeps to synchronise."""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.support.engines import GREEDY, collect, prompts_of, reference
from tests.support.models import tiny_llama_and_tokenizer
from workers.engines.kv_slots import SlotCache
from workers.engines.runner import ModelRunner
from workers.engines.static import StaticBatchingEngine


@pytest.fixture(scope="module")
def tiny() -> tuple[Any, Any]:
    return tiny_llama_and_tokenizer()


async def _greedy_all(
    engine: StaticBatchingEngine, prompts: list[list[int]], budgets: list[int]
) -> list[list[int]]:
    results = await asyncio.gather(
        *(
            collect(engine.generate(p, GREEDY(max_tokens=b)), timeout=120)
            for p, b in zip(prompts, budgets, strict=True)
        )
    )
    return [r.ids for r in results]


def masked_reference(model: Any, prompt: list[int], max_tokens: int) -> list[int]:
    """Greedy tokens of transformers' forward over a ``DynamicCache`` with an explicit
    ``[1, 1, 1, L]`` bool mask at each one-token step (the call the engines make)."""
    from transformers import DynamicCache

    cache: Any = DynamicCache()
    kv = {ModelRunner(model).cache_kw: cache}  # ``cache`` in transformers 5.x
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([prompt]), use_cache=True, logits_to_keep=1, **kv)
        ids = [int(out.logits[0, -1].argmax())]
        for n in range(len(prompt), len(prompt) + max_tokens - 1):
            out = model(
                input_ids=torch.tensor([[ids[-1]]]),
                attention_mask=torch.ones(1, 1, 1, n + 1, dtype=torch.bool),
                position_ids=torch.tensor([[n]]),
                use_cache=True,
                **kv,
            )
            ids.append(int(out.logits[0, -1].argmax()))
    return ids


async def test_growing_slots_match_generate(tiny: tuple[Any, Any]) -> None:
    """Slots of 16 positions double while rows of different lengths run together (the cache
    moves mid-batch, survivors are compacted into holes): every row equals ``generate`` alone."""
    model, tokenizer = tiny
    engine = StaticBatchingEngine(
        model, tokenizer, max_batch_size=4, max_seq_len=256, initial_seq_len=16, eos_token_ids=()
    )
    engine.start()
    try:
        assert engine.kv_cache.length == 16
        prompts = prompts_of(tokenizer, 6, seed=4)
        budgets = [40, 7, 60, 12, 33, 21]
        got = await _greedy_all(engine, prompts, budgets)
    finally:
        engine.close()
    for prompt, budget, ids in zip(prompts, budgets, got, strict=True):
        assert ids == reference(model, prompt, budget, None), f"prompt of {len(prompt)} tokens, {budget} new"
    longest = max(len(p) + b for p, b in zip(prompts, budgets, strict=True))
    assert longest <= engine.kv_cache.length < 2 * longest + 16, (engine.kv_cache.length, longest)
    assert engine.kv_cache.length <= 256


def test_initial_seq_len_is_checked(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="initial_seq_len must be positive, got 0"):
        StaticBatchingEngine(model, tokenizer, max_seq_len=64, initial_seq_len=0)


def test_attention_reads_the_window_only() -> None:
    """A windowed step's K/V are views of the first ``window`` positions of the step's slots, with
    the new token written at its position; without a window, all ``L`` positions."""
    like = [(torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 1, 4))]
    cache = SlotCache.allocate(like, slots=3, length=64)
    layer = cache.layers[0]
    positions = torch.tensor([[5], [17]])
    new = torch.ones(2, 2, 1, 4)
    cache.begin_step(positions, 32)
    keys, values = layer.update(new, new * 2)
    assert keys.shape == values.shape == (2, 2, 32, 4)
    assert keys.data_ptr() == layer.keys.data_ptr(), "a view of the static tensor, not a copy"
    assert keys[0, :, 5].eq(1).all() and keys[1, :, 17].eq(1).all() and values[1, :, 17].eq(2).all()
    assert keys.sum() == 2 * 2 * 4  # nothing else written
    cache.begin_step(positions, None)
    keys, _ = layer.update(new, new)
    assert keys.shape == (2, 2, 64, 4)
    assert cache.grow(128) and cache.length == 128 and not cache.grow(64)
    assert layer.keys[1, :, 17].eq(1).all() and layer.keys[:, :, 64:].eq(0).all()


@pytest.fixture(scope="module")
def tiny_int8(tiny: tuple[Any, Any]) -> tuple[Any, Any]:
    """The tiny Llama with every linear in torch's dynamic int8 (the CPU's ``8-bit``)."""
    from workers.loading.cpu_int8 import quantize_cpu_int8

    model, tokenizer = tiny
    return quantize_cpu_int8(copy.deepcopy(model)), tokenizer


async def test_int8_alone_matches_generate(tiny_int8: tuple[Any, Any]) -> None:
    """8-bit on the CPU in the worker's engine: one stream at a time (bucket 1, the slots
    growing) gives exactly ``generate``'s greedy tokens on the same int8 model. Batched rows are
    not compared: an int8 linear quantizes its input over the whole batch, so a row's rounding
    depends on its neighbours (in ``generate`` too)."""
    model, tokenizer = tiny_int8
    engine = StaticBatchingEngine(
        model, tokenizer, max_batch_size=4, max_seq_len=256, initial_seq_len=16, eos_token_ids=()
    )
    engine.start()
    try:
        prompts = prompts_of(tokenizer, 3, seed=7)
        got = [(await _greedy_all(engine, [p], [30]))[0] for p in prompts]
    finally:
        engine.close()
    for prompt, ids in zip(prompts, got, strict=True):
        assert ids == reference(model, prompt, 30, None), f"prompt of {len(prompt)} tokens"


async def test_int8_batches_choices_and_logprobs(tiny_int8: tuple[Any, Any]) -> None:
    """Batch buckets, n choices and logprobs run over the int8 linears: four requests at once
    (bucket 4, one of them with n = 3 and top-2 logprobs) each get their budget, the logprobs
    are log-probabilities with their top 2, and a row's first token (from the prefill of a prompt
    alone) is ``generate``'s."""
    model, tokenizer = tiny_int8
    engine = StaticBatchingEngine(model, tokenizer, max_batch_size=8, max_seq_len=128, eos_token_ids=())
    engine.start()
    try:
        prompts = prompts_of(tokenizer, 3, seed=9)
        plain = [collect(engine.generate(p, GREEDY(max_tokens=12)), timeout=120) for p in prompts]
        forked = collect(engine.generate(prompts[0], GREEDY(max_tokens=12, n=3, logprobs=2)), timeout=120)
        *results, choices = await asyncio.gather(*plain, forked)
    finally:
        engine.close()
    assert [len(r.ids) for r in results] == [12, 12, 12]
    by_index: dict[int, list[int]] = {}
    for delta in choices.deltas:
        by_index.setdefault(delta.index, []).extend(delta.token_ids)
        for lp in delta.logprobs or []:
            assert lp.logprob <= 0 and len(lp.top) == 2
    assert sorted(by_index) == [0, 1, 2] and all(len(ids) == 12 for ids in by_index.values())
    # Greedy choices of one prompt are the same tokens.
    assert by_index[0] == by_index[1] == by_index[2]
    assert max(engine.bucket_steps) >= 4, dict(engine.bucket_steps)
    for prompt, result in zip(prompts, results, strict=True):
        assert result.ids[0] == reference(model, prompt, 1, None)[0]


@pytest.mark.slow
@pytest.mark.parametrize(("dtype", "batched"), [("float32", True), ("bfloat16", False)])
async def test_smollm2_matches_transformers(smollm2_dir: Path, dtype: str, batched: bool) -> None:
    """SmolLM2-135M-Instruct as the CPU worker runs it (slots growing from a short start): ~100-
    token chat prompts give transformers' greedy tokens for the same dtype; in fp32 batched
    together, against ``generate``. In bf16 one at a time, against transformers' forward given
    the engine's ready 4-D mask: in bf16 a batch rounds differently from one row, and SDPA with a
    mask differently from ``generate``'s unmasked call (the padded engine leaves ``generate`` at
    the 22nd token of one of these prompts alone, and at the 10th batched)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(
        smollm2_dir, dtype=getattr(torch, dtype), attn_implementation="sdpa"
    ).eval()
    topics = ["the tides", "a steam engine", "why leaves fall"]
    # Token ids: a list, or with newer transformers a BatchEncoding holding them.
    templated: list[Any] = [
        tokenizer.apply_chat_template(
            [
                {
                    "role": "user",
                    "content": f"Explain {t} to a child, in detail. " + "Be clear and kind. " * 14,
                }
            ],
            add_generation_prompt=True,
        )
        for t in topics
    ]
    prompts = [list(p.input_ids) if hasattr(p, "input_ids") else list(p) for p in templated]
    assert all(90 <= len(p) <= 140 for p in prompts), [len(p) for p in prompts]
    engine = StaticBatchingEngine(
        model, tokenizer, max_batch_size=4, max_seq_len=2048, initial_seq_len=128, eos_token_ids=()
    )
    engine.start()
    try:
        if batched:
            got = await _greedy_all(engine, prompts, [24, 24, 24])
        else:
            prompts = prompts[:2]  # one at a time: two prompts keep the test lean
            got = [(await _greedy_all(engine, [p], [24]))[0] for p in prompts]
    finally:
        engine.close()
    for prompt, ids in zip(prompts, got, strict=True):
        want = reference(model, prompt, 24, None) if batched else masked_reference(model, prompt, 24)
        assert ids == want, tokenizer.decode(prompt[-20:])
    assert engine.kv_cache.length == 256  # grew once, from 128


@pytest.mark.slow
async def test_smollm2_int8_knows_paris(smollm2_dir: Path) -> None:
    """SmolLM2-135M-Instruct loaded as the CPU worker loads ``8-bit`` (torch's int8 linears, the
    tied head copied): the engine answers "Paris", with ``generate``'s greedy tokens alone. The
    prompt asks for one word: int8 moves a 135M model's greedy path (on the bare question it
    leaves fp32's answer at the first token, and with the 7-bit input range of CPUs without VNNI
    it drops "Paris")."""
    from workers.loading import ModelSource, load_llm

    loaded = load_llm(ModelSource(smollm2_dir, "uri"), quantization="8-bit")
    model, tokenizer = loaded.model, loaded.tokenizer
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France? Answer in one word."}],
        add_generation_prompt=True,
    )
    prompt = list(prompt.input_ids) if hasattr(prompt, "input_ids") else list(prompt)
    engine = StaticBatchingEngine(model, tokenizer, max_batch_size=4, max_seq_len=2048, initial_seq_len=128)
    engine.start()
    try:
        result = await collect(engine.generate(prompt, GREEDY(max_tokens=16)), timeout=120)
    finally:
        engine.close()
    assert "Paris" in result.text, result.text
    assert result.ids == reference(model, prompt, 16, tokenizer.eos_token_id)[: len(result.ids)]
