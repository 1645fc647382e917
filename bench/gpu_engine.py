"""GPU throughput: StaticBatchingEngine (CUDA graphs) vs BatchingEngine vs padded ``model.generate``.

A Llama-3.2-1B-shaped model (hidden 2048, 16 layers, 32 heads, 8 KV heads, intermediate 8192,
vocab 128256) with random bf16 weights and SDPA attention; 128-token prompts, 256 new tokens,
greedy, EOS off. For each concurrency C every contender gets C requests at once (``generate``: one
call over a [C, 128] batch); the figure is tokens generated / wall time, prefill included, median
of ``--repeats`` runs after a short warm-up. Targets (H100): >= 300 tok/s at C=1 and >= 5,000 tok/s
at C=256 for the static engine. Run from the repo root on a CUDA machine:

    python bench/gpu_engine.py [--concurrency 1,64,256] [--repeats 2] [--contenders static,batching,generate]

``--smoke`` runs the same script on a tiny model (on the CPU if there is no GPU) to check that it
works; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from workers.engines.api import Engine
from workers.engines.batching import BatchingEngine, SamplingParams
from workers.engines.static import StaticBatchingEngine

LLAMA_1B = dict(
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    max_position_embeddings=131072,
    rope_theta=500000.0,
    tie_word_embeddings=True,
)
SMOKE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=512,
    max_position_embeddings=512,
    tie_word_embeddings=True,
)
TARGETS = {1: 300.0, 256: 5000.0}  # static engine, tokens/s on an H100


def build_model(shape: dict[str, Any], device: torch.device, dtype: torch.dtype) -> Any:
    config = LlamaConfig(**shape)
    torch.manual_seed(0)
    # Initialised directly on the device: 1.2B fp32 parameters initialised on the CPU take minutes.
    with device:
        model = LlamaForCausalLM._from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def build_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with one token per id: the engines detokenise every generated id,
    and no real 128k vocabulary is at hand offline."""
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", pad_token="t0")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_generate(model: Any, prompts: torch.Tensor, new_tokens: int) -> float:
    device = prompts.device
    with torch.inference_mode():
        sync(device)
        t0 = time.perf_counter()
        out = model.generate(
            prompts,
            attention_mask=torch.ones_like(prompts),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
        sync(device)
        dt = time.perf_counter() - t0
    assert out.shape[1] == prompts.shape[1] + new_tokens, out.shape
    return dt


async def _engine_run(engine: Engine, prompts: list[list[int]], new_tokens: int) -> float:
    params = SamplingParams(max_tokens=new_tokens, temperature=0)

    async def one(p: list[int]) -> int:
        n = 0
        async for d in engine.generate(p, params):
            n += len(d.token_ids)
        return n

    t0 = time.perf_counter()
    counts = await asyncio.gather(*(one(p) for p in prompts))
    dt = time.perf_counter() - t0
    assert all(c == new_tokens for c in counts), counts
    return dt


def run_engine(engine: Engine, prompts: torch.Tensor, new_tokens: int) -> float:
    return asyncio.run(_engine_run(engine, prompts.tolist(), new_tokens))


def measure(fn: Callable[[int], float], new_tokens: int, repeats: int) -> float:
    fn(min(8, new_tokens))  # warm-up: kernels, allocator, first-use captures
    return statistics.median(fn(new_tokens) for _ in range(repeats))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", default="1,64,256")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--contenders", default="static,batching,generate")
    ap.add_argument("--smoke", action="store_true", help="tiny model, CPU allowed: checks the script only")
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print(
            "bench/gpu_engine.py needs a CUDA GPU (torch.cuda.is_available() is False here: "
            f"torch {torch.__version__}). It measures CUDA-graph decoding; run it on a GPU machine, "
            "or pass --smoke to check the script on a tiny model.",
            file=sys.stderr,
        )
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    shape = SMOKE if args.smoke else LLAMA_1B
    concurrency = [int(c) for c in args.concurrency.split(",")]
    contenders = args.contenders.split(",")
    max_batch = max(concurrency)
    max_seq = args.prompt_len + args.new_tokens

    name = torch.cuda.get_device_name(device) if cuda else "CPU"
    print(
        f"{name}; torch {torch.__version__}; {'smoke model' if args.smoke else 'Llama-3.2-1B shape'}, "
        f"{dtype}, sdpa; prompt {args.prompt_len}, {args.new_tokens} new tokens, greedy, EOS off; "
        f"median of {args.repeats}",
        flush=True,
    )
    t0 = time.perf_counter()
    model = build_model(shape, device, dtype)
    tokenizer = build_tokenizer(int(shape["vocab_size"]))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e9:.2f}B parameters, built in {time.perf_counter() - t0:.1f}s", flush=True)
    gen = torch.Generator().manual_seed(0)
    prompts = {
        c: torch.randint(3, int(shape["vocab_size"]), (c, args.prompt_len), generator=gen).to(device)
        for c in concurrency
    }

    results: dict[str, dict[int, float]] = {}
    for contender in contenders:
        engine: Engine | None = None
        if contender == "static":
            engine = StaticBatchingEngine(
                model,
                tokenizer,
                max_batch_size=max_batch,
                max_seq_len=max_seq,
                eos_token_ids=(),
                capture_at_start=True,
            )
            t0 = time.perf_counter()
            engine.start()
            kinds = sorted({r.kind for r in engine.runners.values()})
            print(
                f"static: KV cache {engine.kv_cache.nbytes() / 2**30:.2f} GiB, "
                f"buckets {list(engine.buckets)}, "
                f"runners {kinds} built in {time.perf_counter() - t0:.1f}s",
                flush=True,
            )
        elif contender == "batching":
            engine = BatchingEngine(model, tokenizer, max_batch_size=max_batch, eos_token_ids=())
            engine.start()
        elif contender != "generate":
            raise SystemExit(f"unknown contender {contender!r}")
        results[contender] = {}
        try:
            for c in concurrency:
                fn: Callable[[int], float]
                if engine is not None:
                    fn = functools.partial(run_engine, engine, prompts[c])
                else:
                    fn = functools.partial(run_generate, model, prompts[c])

                dt = measure(fn, args.new_tokens, args.repeats)
                tps = c * args.new_tokens / dt
                results[contender][c] = tps
                print(f"{contender:9s} C={c:4d}  {tps:9.0f} tok/s  ({dt:7.2f} s)", flush=True)
            if isinstance(engine, StaticBatchingEngine):
                print(f"static: decode steps by bucket {dict(sorted(engine.bucket_steps.items()))}")
        finally:
            if engine is not None:
                engine.close()
        if cuda:
            torch.cuda.empty_cache()

    print("\ntokens/s     " + "".join(f"{'C=' + str(c):>11s}" for c in concurrency))
    for contender, row in results.items():
        print(f"{contender:12s} " + "".join(f"{row.get(c, float('nan')):11.0f}" for c in concurrency))
    if "static" in results and not args.smoke:
        for c, target in TARGETS.items():
            if c in results["static"]:
                got = results["static"][c]
                verdict = "met" if got >= target else "MISSED"
                print(f"target static C={c}: >= {target:.0f} tok/s: {got:.0f} ({verdict})")
    if cuda:
        print(f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
