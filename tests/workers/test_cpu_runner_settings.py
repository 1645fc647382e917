"""The CPU runner's settings reach the engine a launch builds: static KV slots by default (the
padded cache with ``cpu_kv="padded"``), torch's thread count, the weights' dtype; and the
worker serves through them. A real nats-server, an in-process worker, the tiny Llama on disk."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.support.worker import llm_definition, running_harness
from workers import WorkerSettings
from workers.builder import CPU_INITIAL_SEQ
from workers.engines import BatchingEngine, StaticBatchingEngine


@pytest.fixture
def restore_threads() -> Iterator[None]:
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _engine(harness: Any, uid: str) -> Any:
    (replica,) = harness.worker.models[uid].replicas.values()
    return replica.engine


async def _generate(harness: Any, uid: str) -> dict[str, Any]:
    body = {"prompt": "SELECT name FROM", "generate_config": {"max_tokens": 5}}
    msg = await harness.raw(harness.subjects.model(uid, "generate"), body)
    completion: dict[str, Any] = json.loads(msg.data)
    return completion


async def test_defaults_are_static_slots_in_fp32(
    nats_url: str, prefix: str, tiny_llama_dir: Path, unique: str, restore_threads: None
) -> None:
    torch.set_num_threads(2)
    async with running_harness(nats_url, prefix, torch_threads=1) as harness:
        uid = f"tiny-{unique}"
        await harness.launch(uid, llm_definition("tiny", str(tiny_llama_dir)))
        engine = _engine(harness, uid)
        assert isinstance(engine, StaticBatchingEngine), type(engine)
        assert engine.kv_cache.length == CPU_INITIAL_SEQ
        assert engine.kv_cache.layers[0].keys.dtype == torch.float32
        assert torch.get_num_threads() == 1
        completion = await _generate(harness, uid)
        assert completion["usage"]["completion_tokens"] >= 1, completion


async def test_padded_cache_on_request(nats_url: str, prefix: str, tiny_llama_dir: Path, unique: str) -> None:
    async with running_harness(nats_url, prefix, cpu_kv="padded") as harness:
        uid = f"tiny-{unique}"
        await harness.launch(uid, llm_definition("tiny", str(tiny_llama_dir)))
        assert isinstance(_engine(harness, uid), BatchingEngine)
        completion = await _generate(harness, uid)
        assert completion["usage"]["completion_tokens"] >= 1, completion


async def test_bf16_weights_on_request(nats_url: str, prefix: str, tiny_llama_dir: Path, unique: str) -> None:
    async with running_harness(nats_url, prefix, cpu_dtype="bfloat16") as harness:
        uid = f"tiny-{unique}"
        await harness.launch(uid, llm_definition("tiny", str(tiny_llama_dir)))
        engine = _engine(harness, uid)
        # The slots are shaped after the K/V the model produces: bf16 weights, bf16 cache.
        assert engine.kv_cache.layers[0].keys.dtype == torch.bfloat16
        completion = await _generate(harness, uid)
        assert completion["usage"]["completion_tokens"] >= 1, completion


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("cpu_kv", "paged", "cpu_kv must be one of ['slots', 'padded'], got 'paged'"),
        ("torch_threads", 0, "torch_threads must be positive, got 0"),
        ("cpu_dtype", "float16", "cpu_dtype must be one of ['float32', 'bfloat16'], got 'float16'"),
    ],
)
def test_bad_settings_name_the_field(field: str, value: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        WorkerSettings("nats://127.0.0.1:4222", **{field: value})


def test_a_model_the_slots_cannot_serve_gets_the_padded_cache() -> None:
    """A sliding window shorter than the context: the static slots refuse it (their mask is full
    causal attention), so the CPU engine is the padded cache, as before static slots."""
    from transformers import MistralConfig, MistralForCausalLM

    from tests.support.models import tiny_tokenizer
    from workers.builder import cpu_engine

    tokenizer = tiny_tokenizer(chat_template=None)
    config = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        sliding_window=16,
        max_position_embeddings=128,
        attn_implementation="sdpa",  # type: ignore[call-arg]  # taken by the config's **kwargs, not typed
    )
    mistral = MistralForCausalLM(config).eval()
    engine = cpu_engine(mistral, tokenizer, max_batch_size=2, context=128, kv="slots")
    assert isinstance(engine, BatchingEngine), type(engine)


def test_cpu_engine_by_layout(tiny_llama_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workers.builder import cpu_engine

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, attn_implementation="sdpa").eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    slots = cpu_engine(model, tokenizer, max_batch_size=2, context=512, kv="slots")
    assert isinstance(slots, StaticBatchingEngine) and slots.context_length == 512
    assert slots.kv_cache.length == CPU_INITIAL_SEQ
    # A Llama on the CPU decodes through the lean step (workers/engines/llama_step.py); fp32
    # keeps torch's threads at every bucket.
    assert slots.lean_step and slots.single_thread_buckets == 0
    padded = cpu_engine(model, tokenizer, max_batch_size=2, context=512, kv="padded")
    assert isinstance(padded, BatchingEngine)
