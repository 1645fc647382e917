"""The lean decode step (``workers/engines/llama_step.py``): the same logits, to the bit, as the
model's own forward in the static engine's step, in fp32 and in torch's int8, for one row and
for batches, windowed and not; the engine takes it only where it can, and says why not."""

from __future__ import annotations

import copy
import types
from typing import Any

import pytest
import torch

from tests.support.models import tiny_llama, tiny_llama_and_tokenizer, tiny_tokenizer
from workers.engines.llama_step import LlamaDecode, lean_step_unsupported
from workers.engines.static import StaticBatchingEngine


@pytest.fixture(scope="module")
def tiny() -> tuple[Any, Any]:
    return tiny_llama_and_tokenizer(seed=3)


@pytest.fixture(scope="module")
def tiny_int8(tiny: tuple[Any, Any]) -> tuple[Any, Any]:
    from workers.loading.cpu_int8 import quantize_cpu_int8

    model, tokenizer = tiny
    return quantize_cpu_int8(copy.deepcopy(model)), tokenizer


def _engine(model: Any, tokenizer: Any, **kwargs: Any) -> StaticBatchingEngine:
    return StaticBatchingEngine(
        model, tokenizer, max_batch_size=8, max_seq_len=128, initial_seq_len=64, eos_token_ids=(), **kwargs
    )


def _both_steps(engine: StaticBatchingEngine, bucket: int, rows: int, window: bool) -> tuple[Any, Any]:
    """Logits of one decode step through the model's forward and through the lean step, from
    the same random K/V and the same inputs (rows ``rows..bucket-1`` are padding)."""
    step = engine.decode_step
    lean = step.lean
    assert lean is not None
    fake: Any = [types.SimpleNamespace(last_token=3 + 5 * i, n_ctx=9 + 4 * i) for i in range(rows)]
    step.load(fake, bucket)  # load reads each row's last token and position only
    outs = []
    for which in (None, lean):
        generator = torch.Generator().manual_seed(11)
        for layer in engine.kv_cache.layers:
            layer.keys.copy_(torch.randn(layer.keys.shape, generator=generator))
            layer.values.copy_(torch.randn(layer.values.shape, generator=generator))
        step.lean = which
        with torch.inference_mode():
            logits, greedy = step(bucket) if window else step(bucket, engine.kv_cache.length)
        outs.append(
            (logits.clone(), greedy.clone(), [layer.keys.clone() for layer in engine.kv_cache.layers])
        )
    step.lean = lean
    return outs[0], outs[1]


@pytest.mark.parametrize("quantized", [False, True], ids=["fp32", "int8"])
@pytest.mark.parametrize(("bucket", "rows"), [(1, 1), (4, 3), (8, 8)])
@pytest.mark.parametrize("window", [True, False], ids=["window", "all-positions"])
def test_lean_step_equals_the_model_forward(
    tiny: tuple[Any, Any], tiny_int8: tuple[Any, Any], quantized: bool, bucket: int, rows: int, window: bool
) -> None:
    model, tokenizer = tiny_int8 if quantized else tiny
    engine = _engine(model, tokenizer)
    assert engine.lean_step
    (ref_logits, ref_greedy, ref_kv), (logits, greedy, kv) = _both_steps(engine, bucket, rows, window)
    assert torch.equal(logits, ref_logits), (
        f"bucket {bucket}: logits differ by up to {(logits - ref_logits).abs().max().item():.3g}"
    )
    assert torch.equal(greedy, ref_greedy)
    for layer, (got, want) in enumerate(zip(kv, ref_kv, strict=True)):
        assert torch.equal(got, want), f"layer {layer}'s keys differ after the step"


def test_fp32_modules_share_the_stacked_weights(tiny: tuple[Any, Any]) -> None:
    """In fp32 the stacked q/k/v and gate/up weights are the modules' own memory (prefill runs
    the modules): the lean step holds no copy."""
    model, tokenizer = tiny
    before = sum(p.numel() for p in model.parameters())
    assert _engine(model, tokenizer).lean_step
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert attn.k_proj.weight.untyped_storage().data_ptr() == attn.q_proj.weight.untyped_storage().data_ptr()
    assert (
        mlp.up_proj.weight.untyped_storage().data_ptr() == mlp.gate_proj.weight.untyped_storage().data_ptr()
    )
    assert attn.k_proj.weight.data_ptr() == attn.q_proj.weight.data_ptr() + attn.q_proj.weight.nbytes
    assert sum(p.numel() for p in model.parameters()) == before
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    assert sum(storages.values()) == sum(p.nbytes for p in model.parameters()), "no bytes beyond the weights"


def test_what_the_lean_step_does_not_take() -> None:
    tokenizer = tiny_tokenizer(seed=0, chat_template=None, bos=False)
    eager = tiny_llama(tokenizer)
    eager.config._attn_implementation = "eager"
    assert lean_step_unsupported(eager) == "attention 'eager' is not 'sdpa'"
    half = tiny_llama(tokenizer).to(torch.bfloat16)
    assert lean_step_unsupported(half) == "the input embedding is not an fp32 nn.Embedding"
    other = tiny_llama(tokenizer)
    other.config.model_type = "gemma"
    assert "model_type 'gemma' is not one of" in str(lean_step_unsupported(other))
    biased = tiny_llama(tokenizer)
    mlp = biased.model.layers[1].mlp
    mlp.up_proj = torch.nn.Linear(mlp.up_proj.in_features, mlp.up_proj.out_features, bias=True)
    assert lean_step_unsupported(biased) == "layer 1: the MLP has biases"
    with pytest.raises(ValueError, match="lean_step=True, but attention 'eager' is not 'sdpa'"):
        _engine(eager, tokenizer, lean_step=True)
    with pytest.raises(ValueError, match="the lean decode step cannot run this model: layer 1: the MLP"):
        LlamaDecode(biased)


def test_the_engine_chooses(tiny: tuple[Any, Any]) -> None:
    """On by default where it can run; off when asked, and for a model it cannot take (the
    model's own forward then decodes)."""
    model, tokenizer = tiny
    assert _engine(model, tokenizer).lean_step
    assert not _engine(model, tokenizer, lean_step=False).lean_step
    eager = tiny_llama(tiny_tokenizer(seed=0, chat_template=None, bos=False))
    eager.config._attn_implementation = "eager"
    assert not _engine(eager, tokenizer).lean_step


def test_step_threads_set_the_calling_thread_only() -> None:
    """``StepThreads`` gives the generation thread one OpenMP thread for small buckets and all of
    them otherwise; another thread keeps torch's count."""
    import threading

    from workers.engines.threads import StepThreads

    if torch.get_num_threads() < 2:
        pytest.skip("one torch thread: nothing to switch")
    threads = StepThreads(single_up_to=4)
    assert threads.active, "torch's OpenMP build exposes omp_set_num_threads"
    seen: dict[str, int] = {}

    def generation_thread() -> None:
        threads.use(1)
        seen["bucket 1"] = torch.get_num_threads()
        threads.use(4)
        seen["bucket 4"] = torch.get_num_threads()
        threads.use(8)
        seen["bucket 8"] = torch.get_num_threads()
        threads.use(2)
        threads.use_all()
        seen["prefill"] = torch.get_num_threads()
        threads.use(1)

    worker = threading.Thread(target=generation_thread)
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive(), "the thread did not finish within 30 s"
    full = threads.threads
    assert seen == {"bucket 1": 1, "bucket 4": 1, "bucket 8": full, "prefill": full}
    assert torch.get_num_threads() == full, "the calling thread's count only"
    assert not StepThreads(single_up_to=0).active


def test_int8_models_take_one_thread_for_small_buckets(
    tiny: tuple[Any, Any], tiny_int8: tuple[Any, Any]
) -> None:
    from workers.engines.threads import INT8_SINGLE_UP_TO, int8_single_thread_buckets

    assert int8_single_thread_buckets(tiny_int8[0]) == INT8_SINGLE_UP_TO
    assert int8_single_thread_buckets(tiny[0]) == 0


def _tiny_other(model_type: str, tokenizer: Any) -> Any:
    """A tiny random model of another architecture the lean step names (Qwen2 has biases on q, k
    and v, which the merge stacks too)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.5,
        sliding_window=None,
        use_sliding_window=False,
    )
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return model.eval()


@pytest.mark.parametrize("model_type", ["qwen2", "mistral"])
@pytest.mark.parametrize("quantized", [False, True], ids=["fp32", "int8"])
def test_other_llama_shaped_models(tiny: tuple[Any, Any], model_type: str, quantized: bool) -> None:
    from workers.loading.cpu_int8 import quantize_cpu_int8

    _, tokenizer = tiny
    model = _tiny_other(model_type, tokenizer)
    if model_type == "qwen2":
        assert model.model.layers[0].self_attn.q_proj.bias is not None
    if quantized:
        model = quantize_cpu_int8(model)
    engine = _engine(model, tokenizer)
    assert engine.lean_step, lean_step_unsupported(model)
    (ref_logits, _, ref_kv), (logits, _, kv) = _both_steps(engine, 4, 3, window=True)
    assert torch.equal(logits, ref_logits), (logits - ref_logits).abs().max().item()
    assert all(torch.equal(a, b) for a, b in zip(kv, ref_kv, strict=True))
