"""Throughput probe: BatchingEngine vs padded static-batch ``model.generate`` (not a test).

Random-weight Llamas, 100-token prompts, 32 new tokens, greedy, EOS off. For each concurrency C
the engine gets C requests at once and the baseline one ``generate`` call over a [C, 100] batch;
both figures are tokens generated / wall time including prefill. Run from the repo root:

    python bench/_engine_probe.py [--repeats 5] [--models tiny,small]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests._tiny import build_tiny_llama, build_tiny_tokenizer
from workers.engines.batching import BatchingEngine, SamplingParams

PROMPT_LEN = 100
NEW_TOKENS = 32
MODELS = {
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "small": dict(
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
    ),
}


def _baseline(model: Any, prompts: torch.Tensor) -> float:
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model.generate(
            prompts,
            attention_mask=torch.ones_like(prompts),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
        dt = time.perf_counter() - t0
    assert out.shape[1] == PROMPT_LEN + NEW_TOKENS
    return dt


async def _engine_run(engine: BatchingEngine, prompts: torch.Tensor) -> float:
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0)

    async def one(p: list[int]) -> int:
        n = 0
        async for d in engine.generate(p, params):
            n += len(d.token_ids)
        return n

    t0 = time.perf_counter()
    counts = await asyncio.gather(*(one(p) for p in prompts.tolist()))
    dt = time.perf_counter() - t0
    assert all(c == NEW_TOKENS for c in counts), counts
    return dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--models", default="tiny,small")
    ap.add_argument("--concurrency", default="1,8,32")
    args = ap.parse_args()
    tokenizer = build_tiny_tokenizer()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; prompt {PROMPT_LEN}, "
        f"{NEW_TOKENS} new tokens, greedy, EOS off; median of {args.repeats}"
    )
    for name in args.models.split(","):
        model = build_tiny_llama(len(tokenizer), max_position_embeddings=512, **MODELS[name])
        engine = BatchingEngine(model, tokenizer, max_batch_size=32, eos_token_ids=())
        engine.start()
        gen = torch.Generator().manual_seed(0)
        try:
            for conc in (int(c) for c in args.concurrency.split(",")):
                prompts = torch.randint(3, len(tokenizer), (conc, PROMPT_LEN), generator=gen)
                _baseline(model, prompts)  # warm-up
                asyncio.run(_engine_run(engine, prompts))
                base, eng = [], []
                for _ in range(args.repeats):
                    base.append(_baseline(model, prompts))
                    eng.append(asyncio.run(_engine_run(engine, prompts)))
                b, e = statistics.median(base), statistics.median(eng)
                toks = conc * NEW_TOKENS
                print(
                    f"{name:5s} C={conc:2d}  generate {toks / b:8.0f} tok/s ({b * 1e3:7.1f} ms)"
                    f"  engine {toks / e:8.0f} tok/s ({e * 1e3:7.1f} ms)  ratio {b / e:4.2f}"
                )
        finally:
            engine.close()


if __name__ == "__main__":
    main()
