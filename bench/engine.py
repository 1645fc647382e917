"""Generation through natserve against plain transformers, on the same model in the same run.

For each model and concurrency C, the same C prompts go through five paths:

    natserve         AsyncClient -> NATS -> worker (BatchingEngine) -> reply; C requests at once,
                     non-streaming: tokens/s and request latency
    natserve-stream  the same with ``stream: true``: time to first token (TTFT) and the gaps
                     between streamed chunks (inter-token latency, ITL)
    sequential       naive ``model.generate`` of the C requests one by one (batch of 1)
    padded           one left-padded static-batch ``model.generate`` over all C requests
    hf-cb            transformers' in-process continuous batching (``init_continuous_batching``)

The baselines run in this process on their own copy of the model while the worker is idle; the
worker (with the registry) runs in a spawned process, nats-server in its own, as in
``bench/overhead.py``. Every tokens/s figure counts the tokens each path really generated,
divided by the wall time of the rounds (prefill included).

CPU workload: two random-weight Llamas built here, "tiny" (hidden 64, 2 layers) and "small"
(hidden 512, 8 layers, 8 heads, 4 KV heads, intermediate 1408), vocabulary 512, 100-token
prompts, 32 new tokens, greedy, EOS off, C = 1, 8, 32. CUDA workload: the Llama-3.2-1B shape
(hidden 2048, 16 layers, 32 heads, 8 KV heads, intermediate 8192, vocab 128256) in bf16,
128-token prompts, 256 new tokens, C = 1, 8, 32, 256. The tokenizer is a byte-level one whose
every id decodes to ASCII text, so one generated token is one streamed chunk.

EOS off: natserve's API has no ``ignore_eos``, so EOS gets the one id past the model's output
vocabulary, which no path can emit; the baselines are also told not to stop. The prompts are
screened so that their greedy continuations hold no other special token either (those decode
to no text and would merge two tokens into one chunk). Every tokens/s figure counts the tokens
really generated; ``*_short`` in the JSON counts requests that ended early (expected 0).

The worker process runs with ``OMP_WAIT_POLICY=PASSIVE`` unless the environment sets it, as
``natserve worker`` does (``--worker-omp-wait-policy`` changes it). Each point records how much
of the machine's CPU other processes took while it ran (``*_foreign_cpu_pct``), waits for a
quiet machine first and is measured again when others took over 10% (``--max-wait``,
``--retries``); ``*_worker_cores`` / ``*_bench_cores`` say how many cores the worker process and
this process used while a path ran.

Also measured: the time from spawning the registry+worker process to both being ready
(``pool_ready_s``; ``ready_s`` adds the nats-server start), the wall time of register and
``launch_model`` of the first model sent the moment the pool is ready (``launch_at_ready_s``: it
waits for the worker's warm-up, which imports torch and the transformers model code on a thread
once the pool answers), and the wall time of ``launch_model`` for each model later, on a warm
worker (``launch_<model>_s``).

Two more rows, on the small model at C = 32 (CPU), measure what clients ask of the sampler
against plain decoding in the same run, on one ``BatchingEngine`` in this process (the wire adds
the same cost to every row, so the engine alone shows the difference): ``json-schema`` decodes
under a JSON schema (constrained by ``workers/engines/grammar.py``; an array of at least 8 small
objects, so that every row runs its 32 tokens through the grammar's structure) and
``logprobs-5`` returns each token's logprob and its top 5. The variants take turns, round by
round, so that a change in the machine's load hits them alike; each ratio is the variant's
tokens/s over plain's (targets: >= 0.85 and >= 0.95). ``--features-only`` runs just these rows
(no nats-server, no pool); ``--no-features`` leaves them out.

    python bench/engine.py [--device cpu|cuda] [--models tiny,small] [--concurrency 1,8,32]
                           [--quick] [--threads N] [--max-wait S] [--retries N] [--json]
                           [--features-only | --no-features] [--feature-rounds N]
    python bench/engine.py --real [--concurrency 1,8,32] [--paths P,...] [--quick] [--threads N]
                           [--omp-wait-policy PASSIVE|ACTIVE|unset]
                           [--baseline-omp unset|ACTIVE|PASSIVE|same] [--json]

``--real`` measures the real model instead: SmolLM2-135M-Instruct on llama.cpp alone (Q4_1 and
F16 files), natserve's GGUF engine and natserve's transformers engine as the worker builds it on
the CPU, fp32 and 8-bit (bench/_real_model.py says how); ``--paths`` picks some of them.
"""

from __future__ import annotations

# Keep the imports at the top light: the spawned pool process re-imports this module, and its
# start-up time is one of the figures.
import argparse
import asyncio
import itertools
import json
import math
import multiprocessing as mp
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._omp import set_wait_policy  # noqa: E402
from bench._pool import llm_definition  # noqa: E402

# ----------------------------------------------------------------------------- workloads

MODELS: dict[str, dict[str, Any]] = {
    # The tiny shape of tests/support/models.build_tiny_llama (4 heads, 2 KV heads, intermediate 128,
    # vocabulary 512).
    "tiny": dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "small": dict(
        vocab_size=512,
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
    ),
    # Llama-3.2-1B's shape (tied embeddings, rope theta 500k), random weights.
    "llama-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=True,
        rope_theta=500000.0,
    ),
}


@dataclass(frozen=True)
class Workload:
    device: str
    dtype: str
    models: tuple[str, ...]
    concurrency: tuple[int, ...]
    prompt_len: int
    new_tokens: int
    min_rounds: int  # rounds of C requests per point, at least
    min_requests: int  # ... and at least this many requests per point
    seq_requests: int  # sequential generate calls per point, at most (it is C x slower)


CPU = Workload("cpu", "float32", ("tiny", "small"), (1, 8, 32), 100, 32, 3, 64, 64)
CUDA = Workload("cuda", "bfloat16", ("llama-1b",), (1, 8, 32, 256), 128, 256, 2, 8, 8)
PATHS = ("natserve", "natserve_stream", "seq", "padded", "hfcb")
LABELS = {
    "natserve": "natserve",
    "natserve_stream": "natserve-stream",
    "seq": "sequential",
    "padded": "padded",
    "hfcb": "hf-cb",
}

# Words for prompts; any text works, this keeps the prompts readable in logs.
_WORDS = (
    "the model reads a message today worker registry answers request every reply sends loads "
    "counts finds keeps report long book numbers prompt small file results many rows token "
    "select from where group order by table users orders products count average after before"
).split()


# ----------------------------------------------------------------------------- pool process


def _run_pool(
    url: str,
    home: str,
    device: str,
    threads: int | None,
    omp_wait_policy: str | None,
    ready: Any,
    stop: Any,
) -> None:
    """Registry and worker in one process, as `natserve up` runs them."""
    # Before torch loads OpenMP; by default as natserve's CLI does for its worker (natserve/cli.py).
    set_wait_policy(omp_wait_policy)
    if threads:
        import torch

        torch.set_num_threads(threads)
    from bench._pool import run_pool

    run_pool(url, home, ready, stop, device=device)


# ----------------------------------------------------------------------------- models


def _synthetic_tokenizer(vocab_size: int) -> Any:
    """A byte-level tokenizer for a model with ``vocab_size`` outputs, plus EOS past them.

    Every id below ``vocab_size`` decodes on its own to non-empty ASCII text (but for ``<unk>``,
    ``<s>`` and ``<pad>``, ids 0-2), so that one generated token is one streamed chunk and the
    gaps between chunks are the gaps between tokens: with the full byte alphabet a random-weight
    model emits stray UTF-8 continuation bytes, whose text the worker rightly holds back until the
    character is whole, which would show up as multi-token "inter-token" gaps. (A trained BPE
    could not reach Llama-3's 128k entries on a small corpus anyway.) No merges: every prompt
    character is one token; the ids past the ASCII characters decode to " w<N>".

    EOS (``</s>``) is id ``vocab_size``, which the model cannot emit: that is "EOS off" on every
    path, natserve's API having no ``ignore_eos``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "<pad>"]
    # Byte-level symbols of the printable ASCII characters: "!".."~" stand for themselves and
    # "\u0120" ("Ġ") for the space.
    ascii_symbols = [chr(c) for c in range(0x21, 0x7F)] + ["\u0120"]
    vocab: dict[str, int] = {}
    for t in specials + ascii_symbols:
        vocab[t] = len(vocab)
    i = 0
    while len(vocab) < vocab_size:
        vocab[f"\u0120w{i}"] = len(vocab)
        i += 1
    vocab["</s>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.add_special_tokens([*specials, "</s>"])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=4096,
    )


def build_model(name: str, dest: Path, workload: Workload) -> Path:
    """Write a random-weight Llama of shape ``MODELS[name]`` and its tokenizer into ``dest``."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    spec = dict(MODELS[name])
    vocab_size = spec.pop("vocab_size")
    dest.mkdir(parents=True, exist_ok=True)
    tokenizer = _synthetic_tokenizer(vocab_size)
    tokenizer.save_pretrained(dest)
    dtype = getattr(torch, workload.dtype)
    config = LlamaConfig(
        vocab_size=vocab_size,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=None,  # outside the vocabulary, see _synthetic_tokenizer
        pad_token_id=tokenizer.pad_token_id,
        **{"tie_word_embeddings": False, **spec},
    )
    config.dtype = dtype  # written to config.json, so "auto" loading picks it too
    device = workload.device if workload.device == "cuda" else "cpu"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        # Built on the target device: initialising 1.2 B parameters on the CPU takes minutes.
        with torch.device(device):
            model = LlamaForCausalLM(config).to(dtype)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(dest, safe_serialization=True)
    del model
    return dest


def load_model(path: Path, workload: Workload) -> Any:
    """Load as the worker's loader does (dtype, SDPA, eval)."""
    import torch
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(
        path, dtype=getattr(torch, workload.dtype), attn_implementation="sdpa"
    )
    return model.to(workload.device).eval()


def n_params(path: Path) -> int:
    from safetensors import safe_open

    total = 0
    for f in path.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                total += math.prod(st.get_slice(k).get_shape())
    return total


def make_prompts(tokenizer: Any, n: int, length: int, seed: int) -> list[str]:
    """``n`` distinct texts that the tokenizer encodes (special tokens included, as the worker
    does) to exactly ``length`` tokens."""
    rng = random.Random(seed)
    out: list[str] = []
    seen: set[str] = set()
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 50 * n + 100:
            raise RuntimeError(f"could not make {n} prompts of exactly {length} tokens")
        text = " ".join(rng.choice(_WORDS) for _ in range(length * 3))
        ids = tokenizer(text)["input_ids"]
        n_special = len(tokenizer("")["input_ids"])  # BOS
        cut = length - n_special
        for trim in (cut, cut - 1, cut + 1, cut - 2):
            candidate = tokenizer.decode(ids[n_special : n_special + trim], skip_special_tokens=True)
            if len(tokenizer(candidate)["input_ids"]) == length:
                break
        else:
            continue
        if candidate not in seen:
            seen.add(candidate)
            out.append(candidate)
    return out


# ----------------------------------------------------------------------------- measuring


@dataclass
class Req:
    latency: float  # s, submit to last token
    tokens: int
    ttft: float | None = None  # s
    gaps: list[float] = field(default_factory=list)  # s between consecutive chunks/tokens


@dataclass
class Point:
    reqs: list[Req] = field(default_factory=list)
    wall: float = 0.0  # s, sum over rounds
    error: str | None = None
    # CPU seconds (utime+stime) of the worker process and of this process during the rounds: for
    # the baselines the worker's share should be ~0, or it was still busy and slowed them down.
    worker_cpu: float = 0.0
    bench_cpu: float = 0.0

    def add(self, reqs: list[Req], wall: float, worker_cpu: float, bench_cpu: float) -> None:
        self.reqs.extend(reqs)
        self.wall += wall
        self.worker_cpu += worker_cpu
        self.bench_cpu += bench_cpu


def paired_deltas(natserve: Point, seq: Point) -> list[float]:
    """At C = 1 every round sends one prompt through natserve and the same prompt through
    ``generate``, minutes apart at most: the differences of those pairs (s). Their median
    estimates natserve's added latency with far less noise than the difference of the two
    medians, which carries the spread between prompts and the machine's drift."""
    if natserve.error or seq.error or len(natserve.reqs) != len(seq.reqs):
        return []
    return [n.latency - s.latency for n, s in zip(natserve.reqs, seq.reqs, strict=True)]


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(values)
    return s[max(0, math.ceil(q * len(s)) - 1)]


class CpuMeter:
    """How much of the machine's CPU went to processes other than this benchmark's own.

    On a shared machine (CI runners, dev boxes) other work skews the figures, tail latency first;
    the share is reported with every point, and ``wait_quiet`` holds a point back until the
    machine is quiet. Linux only (``/proc``); elsewhere it reports nothing.
    """

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.ok = Path("/proc/stat").exists()

    def _read(self) -> tuple[float, float, float]:
        """(busy, total) CPU seconds of the machine, and CPU seconds of our processes."""
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        total = sum(fields[:8])  # guest time is already in user
        busy = total - fields[3] - fields[4]  # minus idle and iowait
        ours = 0
        for pid in self.pids:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    rest = f.read().rsplit(")", 1)[1].split()
                ours += int(rest[11]) + int(rest[12])  # utime, stime
            except (OSError, IndexError, ValueError):
                pass
        return busy / self.tick, total / self.tick, ours / self.tick

    def proc_cpu(self, pid: int) -> float:
        """CPU seconds used so far by one process (all its threads); 0.0 where unknown."""
        if not self.ok:
            return 0.0
        try:
            with open(f"/proc/{pid}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()
            return (int(rest[11]) + int(rest[12])) / self.tick
        except (OSError, IndexError, ValueError):
            return 0.0

    def start(self) -> tuple[float, float, float] | None:
        return self._read() if self.ok else None

    def foreign(self, since: tuple[float, float, float] | None) -> float | None:
        """Share (0..1) of all CPU time since ``since`` used by other processes."""
        if since is None:
            return None
        busy, total, ours = self._read()
        d_total = total - since[1]
        if d_total <= 0:
            return None
        return max(0.0, (busy - since[0]) - (ours - since[2])) / d_total

    def wait_quiet(self, limit: float, max_wait: float, log: Any) -> float | None:
        """Wait (at most ``max_wait`` s) until others use less than ``limit`` of the CPU over 1 s."""
        if not self.ok or max_wait <= 0:
            return None
        deadline = time.monotonic() + max_wait
        while True:
            mark = self.start()
            time.sleep(1.0)
            share = self.foreign(mark)
            if share is None or share < limit or time.monotonic() >= deadline:
                if share is not None and share >= limit:
                    log(f"machine still busy (others use {share:.0%} of the CPU); measuring anyway")
                return share


def summarize(p: Point, new_tokens: int) -> dict[str, float]:
    if not p.reqs:
        return {}
    toks = sum(r.tokens for r in p.reqs)
    lat = [r.latency * 1e3 for r in p.reqs]
    out = {
        "tps": toks / p.wall,
        "p50_ms": statistics.median(lat),
        "p99_ms": pct(lat, 0.99),
        "n": len(p.reqs),
        "short": sum(r.tokens < new_tokens for r in p.reqs),
    }
    if p.wall > 0 and (p.worker_cpu or p.bench_cpu):
        # In cores: 1.0 = one core busy for the whole time.
        out["worker_cores"] = p.worker_cpu / p.wall
        out["bench_cores"] = p.bench_cpu / p.wall
    ttft = [r.ttft * 1e3 for r in p.reqs if r.ttft is not None]
    gaps = [g * 1e3 for r in p.reqs for g in r.gaps]
    if ttft:
        out["ttft_p50_ms"] = statistics.median(ttft)
        out["ttft_p99_ms"] = pct(ttft, 0.99)
    if gaps:
        out["itl_p50_ms"] = statistics.median(gaps)
        out["itl_p99_ms"] = pct(gaps, 0.99)
        # Time per output token after the first, per request: robust to chunks that carry 2 tokens.
        tpot = [
            (r.latency - r.ttft) * 1e3 / (r.tokens - 1) for r in p.reqs if r.ttft is not None and r.tokens > 1
        ]
        out["tpot_p50_ms"] = statistics.median(tpot)
    return out


class Baselines:
    """Plain transformers on the same weights: sequential, padded batch, continuous batching."""

    def __init__(self, path: Path, workload: Workload, max_c: int) -> None:
        import torch
        from transformers import AutoTokenizer, GenerationConfig

        self.torch = torch
        self.workload = workload
        self.model = load_model(path, workload)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.tokenizer.padding_side = "left"
        self.pad_id = self.tokenizer.pad_token_id
        n = workload.new_tokens
        # EOS off: no eos id to stop on, and min_new_tokens as a second guard.
        self.gen = GenerationConfig(
            max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=self.pad_id
        )
        self.cb_model: Any = None
        self.cb: Any = None
        self.cb_error: str | None = None
        try:
            self._start_cb(path, max_c)
        except Exception as exc:  # recorded in the results, the other paths go on
            self.cb_error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]

    def _start_cb(self, path: Path, max_c: int) -> None:
        from transformers import GenerationConfig
        from transformers.generation.continuous_batching.utils import WorkloadHints

        # Its own copy: the manager switches the model's attention implementation to a paged one.
        self.cb_model = load_model(path, self.workload)
        gen = GenerationConfig(
            max_new_tokens=self.workload.new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=self.pad_id,
        )
        hints = WorkloadHints(
            max_prompt_length=self.workload.prompt_len,
            max_generated_length=self.workload.new_tokens,
            num_requests=max_c,
        )
        cb_config = None
        if self.workload.device == "cuda":
            from transformers import ContinuousBatchingConfig

            # By default the paged cache takes 90% of the free GPU memory, which would starve the
            # worker process (its KV cache grows as it goes) on the same GPU.
            cb_config = ContinuousBatchingConfig(max_memory_percent=0.25)
        cb = self.cb_model.init_continuous_batching(
            generation_config=gen, continuous_batching_config=cb_config, workload_hints=hints
        )
        if not cb.warmed_up:
            cb.warmup()
        cb.start()
        self.cb = cb

    def close(self) -> None:
        if self.cb is not None:
            try:
                self.cb.stop(block=True, timeout=10)
                self.cb.destroy()
            except Exception:
                pass
        self.cb = self.cb_model = self.model = None
        if self.workload.device == "cuda":
            self.torch.cuda.empty_cache()

    def ids(self, prompts: list[str]) -> list[list[int]]:
        return [self.tokenizer(p)["input_ids"] for p in prompts]

    def _sync(self) -> None:
        if self.workload.device == "cuda":
            self.torch.cuda.synchronize()

    def padded_out(self, prompts: list[list[int]]) -> Any:
        padded = self.tokenizer.pad({"input_ids": prompts}, padding=True, return_tensors="pt")
        batch = {k: v.to(self.workload.device) for k, v in padded.items()}
        with self.torch.inference_mode():
            out = self.model.generate(**batch, generation_config=self.gen)
        return out[:, batch["input_ids"].shape[1] :].cpu()

    def padded(self, prompts: list[list[int]]) -> tuple[list[Req], float]:
        self._sync()
        t0 = time.perf_counter()
        new = self.padded_out(prompts)
        dt = time.perf_counter() - t0
        return [Req(dt, int(new.shape[1])) for _ in prompts], dt

    def sequential(self, prompts: list[list[int]]) -> tuple[list[Req], float]:
        reqs = []
        for ids in prompts:
            x = self.torch.tensor([ids], device=self.workload.device)
            self._sync()
            t0 = time.perf_counter()
            with self.torch.inference_mode():
                out = self.model.generate(
                    x, attention_mask=self.torch.ones_like(x), generation_config=self.gen
                )
            self._sync()
            reqs.append(Req(time.perf_counter() - t0, int(out.shape[1] - x.shape[1])))
        return reqs, sum(r.latency for r in reqs)

    def continuous(self, prompts: list[list[int]]) -> tuple[list[Req], float]:
        if self.cb is None:
            raise RuntimeError(self.cb_error or "continuous batching is not running")
        cb = self.cb
        t0 = time.perf_counter()
        rids = cb.add_requests(
            inputs=prompts, max_new_tokens=self.workload.new_tokens, record_timestamps=True
        )
        pending, results = set(rids), {}
        while pending:
            res = cb.get_result(timeout=60)
            if res is None:
                if not cb.is_running():
                    raise RuntimeError("transformers' continuous batching thread stopped")
                continue
            if res.request_id in pending and res.is_finished():
                if res.error is not None:
                    raise RuntimeError(f"transformers' continuous batching: {res.error}")
                pending.discard(res.request_id)
                results[res.request_id] = res
        wall = time.perf_counter() - t0
        reqs = []
        for res in results.values():
            stamps = res.timestamps or []
            reqs.append(
                Req(
                    latency=res.lifespan[1] - res.created_time,
                    tokens=len(res.generated_tokens),
                    ttft=stamps[0] - res.created_time if stamps else None,
                    gaps=[b - a for a, b in itertools.pairwise(stamps)],
                )
            )
        return reqs, wall

    def screen(self, prompts: list[str], keep: int, chunk: int) -> tuple[list[str], int]:
        """The first ``keep`` prompts whose greedy continuation holds no special token (they
        decode to no text, so would merge two tokens into one streamed chunk; EOS cannot come).
        Returns them and how many of those kept are not clean (when too few were)."""
        special = set(self.tokenizer.all_special_ids)
        clean: list[str] = []
        dirty: list[str] = []
        for i in range(0, len(prompts), chunk):
            part = prompts[i : i + chunk]
            new = self.padded_out(self.ids(part))
            for p, row in zip(part, new.tolist(), strict=True):
                (dirty if special.intersection(row) else clean).append(p)
            if len(clean) >= keep:
                break
        kept = (clean + dirty)[:keep]
        return kept, max(0, keep - len(clean))


async def natserve_round(
    handle: Any, prompts: list[str], new_tokens: int, stream: bool
) -> tuple[list[Req], float]:
    config = {"max_tokens": new_tokens, "temperature": 0}

    async def plain(prompt: str) -> Req:
        t0 = time.perf_counter()
        reply = await handle.generate(prompt=prompt, generate_config=config)
        return Req(time.perf_counter() - t0, int(reply["usage"]["completion_tokens"]))

    async def streamed(prompt: str) -> Req:
        t0 = time.perf_counter()
        chunks = await handle.generate(prompt=prompt, generate_config={**config, "stream": True})
        stamps: list[float] = []
        tokens = 0
        async for chunk in chunks:
            stamps.append(time.perf_counter())
            usage = chunk.get("usage")
            if usage:
                tokens = int(usage["completion_tokens"])
        end = time.perf_counter()
        return Req(
            end - t0,
            tokens,
            ttft=stamps[0] - t0 if stamps else None,
            gaps=[b - a for a, b in itertools.pairwise(stamps)],
        )

    one = streamed if stream else plain
    t0 = time.perf_counter()
    reqs = await asyncio.gather(*(one(p) for p in prompts))
    return list(reqs), time.perf_counter() - t0


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:300]


async def measure_point(
    handle: Any,
    base: Baselines,
    prompts: list[str],
    prompt_ids: list[list[int]],
    c: int,
    rounds: int,
    seq_per_round: int,
    workload: Workload,
    meter: CpuMeter,
    worker_pid: int,
) -> dict[str, Point]:
    """One warm-up round of every path (not recorded), then ``rounds`` rounds of C requests with
    the paths interleaved, so that drift in the machine's speed hits all of them alike. A path
    that fails keeps its error and is skipped from then on."""
    points = {p: Point() for p in PATHS}

    async def run(path_name: str, idx: list[int], record: bool) -> None:
        point = points[path_name]
        if point.error:
            return
        texts, ids = [prompts[i] for i in idx], [prompt_ids[i] for i in idx]
        w0, b0 = meter.proc_cpu(worker_pid), meter.proc_cpu(os.getpid())
        try:
            if path_name == "natserve":
                reqs, wall = await natserve_round(handle, texts, workload.new_tokens, stream=False)
            elif path_name == "natserve_stream":
                reqs, wall = await natserve_round(handle, texts, workload.new_tokens, stream=True)
            elif path_name == "seq":
                reqs, wall = await asyncio.to_thread(base.sequential, ids)
            elif path_name == "padded":
                reqs, wall = await asyncio.to_thread(base.padded, ids)
            else:
                reqs, wall = await asyncio.to_thread(base.continuous, ids)
        except Exception as exc:
            point.error = _error(exc)
            return
        if record:
            point.add(reqs, wall, meter.proc_cpu(worker_pid) - w0, meter.proc_cpu(os.getpid()) - b0)

    def batch(r: int) -> list[int]:
        return [(r * c + i) % len(prompts) for i in range(c)]

    for p in PATHS:
        await run(p, batch(0)[:1] if p == "seq" else batch(0), record=False)
    for r in range(rounds):
        for p in PATHS:
            idx = batch(r)
            await run(p, idx[:seq_per_round] if p == "seq" else idx, record=True)
    return points


async def bench_model(
    client: Any,
    name: str,
    path: Path,
    workload: Workload,
    concurrency: tuple[int, ...],
    quick: bool,
    results: dict[str, Any],
    log: Any,
    meter: CpuMeter,
    max_wait: float,
    retries: int,
) -> None:
    max_c = max(concurrency)
    size = n_params(path)
    results[f"{name}_params"] = size
    definition = llm_definition(f"bench-{name}", str(path), max(size / 1e9, 1e-6))
    await client.register_model(model_type="LLM", model=definition, persist=False)
    await asyncio.to_thread(meter.wait_quiet, 0.05, max_wait, log)
    mark = meter.start()
    t0 = time.perf_counter()
    uid = await client.launch_model(
        model_name=f"bench-{name}",
        progress=False,
        max_batch_size=max(32, max_c),
        request_limits=max(256, 2 * max_c),
    )
    results[f"launch_{name}_s"] = time.perf_counter() - t0
    foreign = meter.foreign(mark)
    if foreign is not None:
        results[f"launch_{name}_foreign_cpu_pct"] = 100 * foreign
    log(f"{name}: {size / 1e6:.1f} M parameters, launched in {results[f'launch_{name}_s']:.2f} s")
    handle = await client.get_model(model_uid=uid)

    base = await asyncio.to_thread(Baselines, path, workload, max_c)
    try:
        if base.cb_error:
            results[f"{name}_hfcb_error"] = base.cb_error
            log(f"{name}: transformers continuous batching failed: {base.cb_error}")
        candidates = make_prompts(base.tokenizer, max_c + max_c // 2 + 8, workload.prompt_len, seed=1)
        prompts, unclean = await asyncio.to_thread(base.screen, candidates, max_c, max(8, min(max_c, 64)))
        results[f"{name}_prompts_unclean"] = unclean
        prompt_ids = base.ids(prompts)
        assert all(len(ids) == workload.prompt_len for ids in prompt_ids)

        for c in concurrency:
            min_rounds, min_requests = (2, 16) if quick else (workload.min_rounds, workload.min_requests)
            rounds = max(min_rounds, math.ceil(min_requests / c))
            seq_cap = max(4, workload.seq_requests // 4) if quick else workload.seq_requests
            seq_per_round = math.ceil(min(rounds * c, seq_cap) / rounds)
            best: tuple[dict[str, Point], float | None, float] | None = None
            for attempt in range(1 + retries):
                await asyncio.to_thread(meter.wait_quiet, 0.05, max_wait, log)
                mark = meter.start()
                t_point = time.perf_counter()
                points = await measure_point(
                    handle,
                    base,
                    prompts,
                    prompt_ids,
                    c,
                    rounds,
                    seq_per_round,
                    workload,
                    meter,
                    meter.pids[-1],
                )
                foreign = meter.foreign(mark)
                elapsed = time.perf_counter() - t_point
                if best is None or (foreign or 0) < (best[1] or 0):
                    best = (points, foreign, elapsed)
                if foreign is None or foreign <= 0.10:
                    break
                if attempt < retries:
                    log(f"{name} c={c}: other processes took {foreign:.0%} of the CPU; measuring again")
            assert best is not None
            points, foreign, elapsed = best
            if foreign is not None:
                results[f"{name}_c{c}_foreign_cpu_pct"] = 100 * foreign
            for p, point in points.items():
                key = f"{name}_c{c}_{p}"
                if point.error:
                    results[f"{key}_error"] = point.error
                    log(f"{name} c={c} {LABELS[p]} failed: {point.error}")
                for k, v in summarize(point, workload.new_tokens).items():
                    results[f"{key}_{k}"] = v
            ns, pad = results.get(f"{name}_c{c}_natserve_tps"), results.get(f"{name}_c{c}_padded_tps")
            if ns and pad:
                results[f"{name}_c{c}_ratio_padded"] = ns / pad
            for other in ("seq", "hfcb"):
                o = results.get(f"{name}_c{c}_{other}_tps")
                if ns and o:
                    results[f"{name}_c{c}_ratio_{other}"] = ns / o
            if c == 1 and f"{name}_c1_natserve_p50_ms" in results and f"{name}_c1_seq_p50_ms" in results:
                results[f"{name}_c1_p50_delta_ms"] = (
                    results[f"{name}_c1_natserve_p50_ms"] - results[f"{name}_c1_seq_p50_ms"]
                )
                paired = paired_deltas(points["natserve"], points["seq"])
                if paired:
                    results[f"{name}_c1_paired_delta_ms"] = 1000 * statistics.median(paired)
            log(
                f"{name} c={c}: {rounds} rounds in {elapsed:.1f} s"
                + ("" if foreign is None else f" (other processes: {foreign:.0%} of the CPU)")
                + "".join(
                    f"; {LABELS[p]} {results[f'{name}_c{c}_{p}_tps']:.0f} tok/s"
                    for p in PATHS
                    if f"{name}_c{c}_{p}_tps" in results
                )
            )
    finally:
        base.close()
        try:
            await client.terminate_model(model_uid=uid)
        except Exception as exc:
            log(f"{name}: terminate failed: {_error(exc)}")


async def launch_at_ready(client: Any, name: str, path: Path, results: dict[str, Any], log: Any) -> None:
    """Launch ``name`` the moment the pool is ready, as a script that starts natserve and
    launches at once would: the worker's warm-up (the imports of torch and the model-loading
    code, on a thread once the pool answers) is still running, and the launch waits for it. The
    model's own launch later measures a worker that is warm."""
    probe = f"bench-{name}-at-ready"
    t0 = time.perf_counter()
    await client.register_model(model_type="LLM", model=llm_definition(probe, str(path)), persist=False)
    uid = await client.launch_model(model_name=probe, progress=False)
    results["launch_at_ready_s"] = time.perf_counter() - t0
    log(f"{name} launched at ready (register + launch) in {results['launch_at_ready_s']:.2f} s")
    await client.terminate_model(model_uid=uid)
    await client.unregister_model(model_type="LLM", model_name=probe)


# ----------------------------------------------------------------------------- report

# Targets from the benchmark issue (CPU workload only).
RATIO_PADDED_TARGET = {"tiny": 0.5, "small": 0.8}
TARGETS = {
    "c1_p50_delta_ms": 3.0,
    "ready_s": 5.0,
    "launch_tiny_s": 2.0,
}


# ----------------------------------------------------------------------------- sampler features

FEATURE_MODEL = "small"
FEATURE_C = 32
FEATURE_TARGETS = {"json_schema": 0.85, "logprobs5": 0.95}
FEATURE_LABELS = {"plain": "plain", "json_schema": "json-schema", "logprobs5": "logprobs-5"}
# At least 8 objects of three fields: far more than 32 tokens of the synthetic tokenizer (one
# character a token), so that no row ends before max_tokens and every step goes through the mask.
FEATURE_SCHEMA = {
    "type": "object",
    "properties": {
        "people": {
            "type": "array",
            "minItems": 8,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 8},
                    "age": {"type": "integer", "minimum": 0, "maximum": 99},
                    "ok": {"type": "boolean"},
                },
                "required": ["name", "age", "ok"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["people"],
    "additionalProperties": False,
}


def bench_features(path: Path, workload: Workload, rounds: int, results: dict[str, Any], log: Any) -> None:
    """Plain, JSON-schema and logprobs-5 decoding of C prompts at once, on one engine in this
    process, in turns (see the module doc)."""
    from transformers import AutoTokenizer

    from workers.engines.api import Constraint, SamplingParams
    from workers.engines.batching import BatchingEngine

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = load_model(path, workload)
    # The grammar needs an end token inside the vocabulary: <pad> stands in for it. The schema
    # never lets a row end within max_tokens, and the screened prompts' plain continuations
    # hold no special token, so no row of any variant ends early (``*_short`` counts those).
    engine = BatchingEngine(
        model, tokenizer, max_batch_size=FEATURE_C, eos_token_ids=(tokenizer.pad_token_id,)
    )
    engine.start()
    n = workload.new_tokens
    variants = {
        "plain": SamplingParams(max_tokens=n, temperature=0),
        "json_schema": SamplingParams(
            max_tokens=n, temperature=0, constraint=Constraint("json_schema", FEATURE_SCHEMA)
        ),
        "logprobs5": SamplingParams(max_tokens=n, temperature=0, logprobs=5),
    }
    prompts = [
        tokenizer(p)["input_ids"] for p in make_prompts(tokenizer, FEATURE_C, workload.prompt_len, seed=7)
    ]

    async def one_round(params: SamplingParams) -> tuple[float, float, int, int]:
        async def run(ids: list[int]) -> int:
            tokens = 0
            async for delta in engine.generate(ids, params, stream=False):
                tokens = delta.completion_tokens
            return tokens

        t0, c0 = time.perf_counter(), time.process_time()
        counts = await asyncio.gather(*(run(ids) for ids in prompts))
        return time.perf_counter() - t0, time.process_time() - c0, sum(counts), sum(c < n for c in counts)

    async def measure() -> None:
        for params in variants.values():  # warm-up: compiles the schema, fills the caches
            await one_round(params)
        totals = {name: [0.0, 0.0, 0, 0] for name in variants}
        names = list(variants)
        for r in range(rounds):
            # Rotated each round, so that no variant always runs first or last.
            for name in names[r % len(names) :] + names[: r % len(names)]:
                for k, v in enumerate(await one_round(variants[name])):
                    totals[name][k] += v
        for name, (wall, cpu, tokens, short) in totals.items():
            results[f"feature_{name}_tps"] = tokens / wall
            # Tokens per CPU second of this process: on a machine that others load, wall time
            # swings with their load, while the CPU the engine spends per token is its own cost.
            results[f"feature_{name}_cpu_tps"] = tokens / cpu
            results[f"feature_{name}_short"] = short
            log(f"feature {name}: {tokens / wall:.0f} tok/s, {tokens / cpu:.0f} tok/CPU-s, {rounds} rounds")
        for name in FEATURE_TARGETS:
            results[f"feature_{name}_ratio"] = results[f"feature_{name}_tps"] / results["feature_plain_tps"]
            results[f"feature_{name}_cpu_ratio"] = (
                results[f"feature_{name}_cpu_tps"] / results["feature_plain_cpu_tps"]
            )

    try:
        asyncio.run(measure())
    finally:
        engine.close()
    results["feature_rounds"] = rounds


def print_features(results: dict[str, Any]) -> None:
    if "feature_plain_tps" not in results:
        return
    print()
    print(
        f"sampler features: {FEATURE_MODEL} model, C={FEATURE_C}, one BatchingEngine in this process, "
        f"greedy, {results['feature_rounds']} rounds each, in turns"
    )
    print(f"  {'variant':<14}{'tok/s':>9}{'x plain':>9}{'tok/CPU-s':>11}{'x plain':>9}{'short':>7}  target")
    for name, label in FEATURE_LABELS.items():
        ratio = results.get(f"feature_{name}_ratio")
        cpu_ratio = results.get(f"feature_{name}_cpu_ratio")
        goal = FEATURE_TARGETS.get(name)
        verdict = (
            "" if goal is None else f">= {goal}x " + ("ok" if ratio is not None and ratio >= goal else "MISS")
        )
        shown = "-" if ratio is None else f"{ratio:.2f}"
        cpu_shown = "-" if cpu_ratio is None else f"{cpu_ratio:.2f}"
        print(
            f"  {label:<14}{results[f'feature_{name}_tps']:>9.0f}{shown:>9}"
            f"{results[f'feature_{name}_cpu_tps']:>11.0f}{cpu_shown:>9}"
            f"{results[f'feature_{name}_short']:>7}  {verdict}"
        )


def print_report(
    results: dict[str, Any], workload: Workload, models: list[str], concurrency: tuple[int, ...]
) -> None:
    print()
    print(
        f"machine: {results['cpu_count']} cores ({results['cpu']}), torch {results['torch']} "
        f"({results['torch_threads']} threads), transformers {results['transformers']}, "
        f"nats-server {results['nats_server']}, python {results['python']}"
        + (f", {results['gpu']}" if results.get("gpu") else "")
    )
    print(
        f"OpenMP wait policy: worker {results['omp_wait_policy_worker']}, "
        f"baselines {results['omp_wait_policy_baselines']}"
    )
    print(
        f"workload: {workload.device} {workload.dtype}, {workload.prompt_len}-token prompts, "
        f"{workload.new_tokens} new tokens, greedy, EOS off; random-weight Llamas"
    )
    busy = results.get("startup_foreign_cpu_pct")
    print(
        f"start-up: nats-server {results['nats_start_s']:.2f} s, registry+worker process "
        f"{results['pool_ready_s']:.2f} s -> ready {results['ready_s']:.2f} s"
        + ("" if busy is None else f" (other processes: {busy:.0f}% of the CPU)")
    )
    if "launch_at_ready_s" in results:
        print(
            f"launch of {models[0]} sent at ready (it waits for the worker's warm-up): "
            f"{results['launch_at_ready_s']:.2f} s"
        )
    for name in models:
        if f"{name}_params" not in results:
            continue
        spec = MODELS[name]
        print()
        print(
            f"{name}: hidden {spec['hidden_size']}, {spec['num_hidden_layers']} layers, "
            f"{spec['num_attention_heads']} heads, {spec['num_key_value_heads']} KV heads, "
            f"intermediate {spec['intermediate_size']}, {results[f'{name}_params'] / 1e6:.1f} M params; "
            f"launch {results.get(f'launch_{name}_s', float('nan')):.2f} s"
            + (
                f" (other processes: {results[f'launch_{name}_foreign_cpu_pct']:.0f}% of the CPU)"
                if f"launch_{name}_foreign_cpu_pct" in results
                else ""
            )
        )
        head = (
            f"{'C':>4} {'path':<16}{'tok/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'TTFT p50':>10}{'TTFT p99':>10}"
            f"{'ITL p50':>9}{'ITL p99':>9}{'n':>5}{'short':>6}{'x padded':>9}{'cores w/b':>10}"
        )
        print(head)
        for c in concurrency:
            pad = results.get(f"{name}_c{c}_padded_tps")
            for p in PATHS:
                key = f"{name}_c{c}_{p}"
                if f"{key}_error" in results and f"{key}_tps" not in results:
                    print(f"{c:>4} {LABELS[p]:<16}failed: {results[f'{key}_error']}")
                    continue
                if f"{key}_tps" not in results:
                    continue

                def f(k: str, fmt: str = "{:.1f}", key: str = key) -> str:
                    v = results.get(f"{key}_{k}")
                    return "-" if v is None else fmt.format(v)

                ratio = results[f"{key}_tps"] / pad if pad else None
                print(
                    f"{c:>4} {LABELS[p]:<16}{f('tps', '{:.0f}'):>9}{f('p50_ms'):>9}{f('p99_ms'):>9}"
                    f"{f('ttft_p50_ms'):>10}{f('ttft_p99_ms'):>10}{f('itl_p50_ms', '{:.2f}'):>9}"
                    f"{f('itl_p99_ms', '{:.2f}'):>9}{f('n', '{:.0f}'):>5}{f('short', '{:.0f}'):>6}"
                    f"{'-' if ratio is None else f'{ratio:.2f}':>9}"
                    f"{f('worker_cores', '{:.1f}') + '/' + f('bench_cores', '{:.1f}'):>10}"
                )
        shares = [(c, results.get(f"{name}_c{c}_foreign_cpu_pct")) for c in concurrency]
        if any(v is not None for _, v in shares):
            print(
                "  CPU used by other processes while measuring: "
                + ", ".join(f"c={c} {v:.0f}%" for c, v in shares if v is not None)
                + ("  (figures skewed)" if any(v is not None and v > 5 for _, v in shares) else "")
            )
        print(
            "  cores w/b: CPU cores used on average by the worker process / this process while the "
            "path ran (the worker should be idle, ~0, during the baselines)"
        )
        if f"{name}_hfcb_error" in results:
            print(f"  hf-cb failed: {results[f'{name}_hfcb_error']}")
        if results.get(f"{name}_prompts_unclean"):
            print(f"  {results[f'{name}_prompts_unclean']} prompts emit a special token (chunks may merge)")
    if workload.device != "cpu":
        return
    print()
    print("targets (CPU):")

    def check(label: str, value: float | None, ok: bool | None, goal: str) -> None:
        state = "n/a" if value is None else ("ok" if ok else "MISS")
        shown = "-" if value is None else f"{value:.2f}"
        print(f"  {label:<36}{shown:>9}  target {goal:<12}{state}")

    for name in models:
        d = results.get(f"{name}_c1_p50_delta_ms")
        check(
            f"{name} c=1 p50 - generate p50 (ms)",
            d,
            d is not None and d <= TARGETS["c1_p50_delta_ms"],
            "<= 3 ms",
        )
        d = results.get(f"{name}_c1_paired_delta_ms")
        check(
            f"{name} c=1 paired difference (ms)",
            d,
            d is not None and d <= TARGETS["c1_p50_delta_ms"],
            "<= 3 ms",
        )
        goal = RATIO_PADDED_TARGET.get(name)
        r = results.get(f"{name}_c32_ratio_padded")
        if goal is not None:
            check(f"{name} c=32 natserve / padded", r, r is not None and r >= goal, f">= {goal}x")
    check("ready (s)", results.get("ready_s"), results.get("ready_s", 99) < TARGETS["ready_s"], "< 5 s")
    lt = results.get("launch_tiny_s")
    check("launch tiny (s)", lt, lt is not None and lt < TARGETS["launch_tiny_s"], "< 2 s")
    if models[0] == "tiny" and "launch_at_ready_s" in results and "ready_s" in results:
        # Starting natserve and launching at once: both targets together. The launch then waits
        # for the imports the start-up leaves to the warm-up.
        both = results["ready_s"] + results["launch_at_ready_s"]
        goal = TARGETS["ready_s"] + TARGETS["launch_tiny_s"]
        check("ready + launch tiny sent at ready (s)", both, both < goal, f"< {goal:.0f} s")


def print_real(result: dict[str, Any], concurrency: tuple[int, ...]) -> None:
    """The ``--real`` run as a table (tokens/s end to end and decode, TTFT, CPU ms a token) and
    its ratios, each path against the baselines of ``_real_model.RATIOS``."""
    from bench._real_model import RATIOS, key

    print()
    print(
        f"SmolLM2-135M-Instruct, {result['new_tokens']} greedy tokens a request, ~100-token prompts, "
        f"{result['threads']} threads, best of {result['rounds']} round(s), "
        f"OMP_WAIT_POLICY {result['omp_wait_policy']} (llama.cpp alone: "
        f"{result['baseline_omp_wait_policy']})"
    )
    print(
        f"{'C':>4} {'path':<16}{'tok/s':>8}{'decode':>8}{'TTFT ms':>9}{'CPU ms/tok':>11}"
        f"{'load':>6}{'others':>8}"
    )
    for c in concurrency:
        for row in result["rows"]:
            if row["c"] != c:
                continue
            others = row.get("foreign_cpu_pct")
            print(
                f"{c:>4} {row['path']:<16}{row['tokens_per_s']:>8.1f}{row['decode_tokens_per_s']:>8.1f}"
                f"{row['ttft_p50_ms']:>9.0f}{row['cpu_ms_per_token']:>11.1f}{row['load_avg_1m']:>6.1f}"
                f"{'-' if others is None else f'{others:.0f}%':>8}"
            )
    ratios = result["ratios"]
    if ratios:
        print()
        print("ratios (tokens/s end to end, decode):")
        for name, base in RATIOS:
            for c in concurrency:
                k = f"{key(name)}_vs_{key(base)}_c{c}"
                if k in ratios:
                    print(f"  {name} / {base} c={c}: {ratios[k]:.2f} ({ratios[k + '_decode']:.2f} decode)")
    equal = result["gguf_engine_tokens_equal_llama_cpp"]
    if equal:
        print(f"greedy tokens of the GGUF engine equal llama.cpp Q4_1's: {equal}")
    check = result.get("f16_check")
    if check:
        print(
            f"F16 file against Q4_1, greedy on {len(check['f16_vs_q4_1_common_prefix'])} chat prompts: "
            f"{check['f16_vs_q4_1_common_prefix']} leading tokens of {check['of']} the same"
            + (
                f"; against hf-fp32 {check['f16_vs_hf_fp32_common_prefix']}, Q4_1 against hf-fp32 "
                f"{check['q4_1_vs_hf_fp32_common_prefix']}"
                if "f16_vs_hf_fp32_common_prefix" in check
                else ""
            )
        )


# ----------------------------------------------------------------------------- main


def _versions(server_bin: str) -> dict[str, Any]:
    import importlib.metadata
    import subprocess

    import torch
    import transformers

    out = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "nats_py": importlib.metadata.version("nats-py"),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        out["nats_server"] = (
            subprocess.run([server_bin, "--version"], capture_output=True, text=True, timeout=10)
            .stdout.strip()
            .split()[-1]
        )
    except Exception:
        out["nats_server"] = "?"
    try:
        with open("/proc/cpuinfo") as f:
            out["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except Exception:
        out["cpu"] = platform.processor() or "?"
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--models", help="comma-separated, from " + ", ".join(MODELS))
    parser.add_argument("--concurrency", help="comma-separated concurrency levels")
    parser.add_argument("--quick", action="store_true", help="fewer rounds per point")
    parser.add_argument("--threads", type=int, help="torch threads in both processes (default: torch's)")
    parser.add_argument(
        "--max-wait",
        type=float,
        default=60.0,
        help="seconds to wait, before each point, for other processes to leave the CPU "
        "(under 5%%) (default 60; 0: do not wait)",
    )
    parser.add_argument(
        "--worker-omp-wait-policy",
        choices=("PASSIVE", "ACTIVE", "unset"),
        help="OMP_WAIT_POLICY of the worker process (default: as `natserve worker`, PASSIVE unless "
        "the environment sets it)",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=2,
        help="measure a point again when other processes took over 10%% of the CPU (default 2)",
    )
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    features = parser.add_mutually_exclusive_group()
    features.add_argument(
        "--features-only", action="store_true", help="only the sampler-feature rows (CPU, small model)"
    )
    features.add_argument("--no-features", action="store_true", help="leave the sampler-feature rows out")
    parser.add_argument(
        "--feature-rounds", type=int, help="rounds of each sampler-feature variant (default 4, --quick 2)"
    )
    parser.add_argument(
        "--real",
        action="store_true",
        help="the real model instead (SmolLM2-135M-Instruct): llama.cpp alone, natserve's GGUF "
        "engine and its transformers engine, side by side (bench/_real_model.py)",
    )
    parser.add_argument(
        "--paths",
        help="with --real, a comma list of the paths to run (default all but hf-padded): "
        "llama.cpp-Q4_1, llama.cpp-F16, gguf-engine, hf-fp32, hf-int8, hf-fp32-modules, "
        "hf-int8-modules, hf-padded",
    )
    parser.add_argument(
        "--omp-wait-policy",
        choices=("PASSIVE", "ACTIVE", "unset"),
        help="with --real, OMP_WAIT_POLICY of the process (default: PASSIVE unless the environment "
        "sets it, as `natserve worker`)",
    )
    parser.add_argument(
        "--baseline-omp",
        choices=("unset", "ACTIVE", "PASSIVE", "same"),
        default="unset",
        help="with --real, OMP_WAIT_POLICY of the llama.cpp-alone paths, which run in a process of "
        "their own (default unset: OpenMP's default); same: in this process, with its policy",
    )
    args = parser.parse_args()
    if (args.paths or args.omp_wait_policy) and not args.real:
        parser.error("--paths and --omp-wait-policy go with --real")
    if args.real:
        from bench import _real_model

        try:
            real_paths = _real_model.parse_paths(args.paths)
        except ValueError as exc:
            parser.error(str(exc))
        real = tuple(int(c) for c in args.concurrency.split(",")) if args.concurrency else (1, 8, 32)
        result = _real_model.run(
            real,
            args.threads,
            512,
            lambda line: print(line, flush=True),
            rounds=1 if args.quick else 2,
            paths=real_paths,
            omp_wait_policy=args.omp_wait_policy,
            baseline_omp=args.baseline_omp,
        )
        print_real(result, real)
        if args.json:
            print(json.dumps(result))
        return 0
    feature_rounds = args.feature_rounds or (2 if args.quick else 4)

    workload = CPU if args.device == "cpu" else CUDA
    models = args.models.split(",") if args.models else list(workload.models)
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    concurrency = (
        tuple(int(c) for c in args.concurrency.split(",")) if args.concurrency else workload.concurrency
    )

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "error: --device cuda, but torch sees no CUDA device "
            f"(torch {torch.__version__}, built with CUDA {torch.version.cuda})",
            file=sys.stderr,
        )
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)

    from natserve.embedded import nats_server_binary
    from tests.support.nats_server import NatsServer

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    if args.features_only:
        if args.device != "cpu":
            parser.error("--features-only measures the CPU engine")
        home = tempfile.mkdtemp(prefix="natserve-bench-")
        feature_results: dict[str, Any] = {}
        try:
            path = build_model(FEATURE_MODEL, Path(home) / FEATURE_MODEL, workload)
            bench_features(path, workload, feature_rounds, feature_results, log)
        finally:
            shutil.rmtree(home, ignore_errors=True)
        print_features(feature_results)
        if args.json:
            print(
                json.dumps(
                    {k: round(v, 4) if isinstance(v, float) else v for k, v in feature_results.items()}
                )
            )
        return 0

    results: dict[str, Any] = {
        "device": args.device,
        "dtype": workload.dtype,
        "prompt_len": workload.prompt_len,
        "new_tokens": workload.new_tokens,
        "models": models,
        "concurrency": list(concurrency),
        "quick": args.quick,
    }
    results.update(_versions(nats_server_binary()))
    # The worker process runs with OMP_WAIT_POLICY=PASSIVE unless set (as `natserve worker`);
    # the baselines run in this process with the environment as it is.
    results["omp_wait_policy_worker"] = (
        os.environ.get("OMP_WAIT_POLICY", "PASSIVE")
        if args.worker_omp_wait_policy is None
        else args.worker_omp_wait_policy
    )
    results["omp_wait_policy_baselines"] = os.environ.get("OMP_WAIT_POLICY", "(unset)")

    home = tempfile.mkdtemp(prefix="natserve-bench-")
    t0 = time.perf_counter()
    server = NatsServer().start()
    results["nats_start_s"] = time.perf_counter() - t0
    assert server.proc is not None
    ctx = mp.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    pool = ctx.Process(
        target=_run_pool,
        args=(server.url, home, args.device, args.threads, args.worker_omp_wait_policy, ready, stop),
    )
    meter = CpuMeter([os.getpid(), server.proc.pid])
    try:
        # Built before the pool starts, so that the first can be launched the moment it is ready.
        paths = {}
        for name in models:
            t1 = time.perf_counter()
            paths[name] = build_model(name, Path(home) / "models" / name, workload)
            log(f"built {name} in {time.perf_counter() - t1:.1f} s")

        meter.wait_quiet(0.05, args.max_wait, log)
        mark = meter.start()
        t0 = time.perf_counter()
        pool.start()
        assert pool.pid is not None
        meter.pids.append(pool.pid)
        while not ready.wait(0.05):
            if not pool.is_alive():
                raise RuntimeError(f"the registry+worker process exited with code {pool.exitcode}")
            if time.perf_counter() - t0 > 180:
                raise RuntimeError("registry and worker were not ready within 180 s")
        results["pool_ready_s"] = time.perf_counter() - t0
        foreign = meter.foreign(mark)
        if foreign is not None:
            results["startup_foreign_cpu_pct"] = 100 * foreign
        results["ready_s"] = results["nats_start_s"] + results["pool_ready_s"]
        log(f"registry+worker ready {results['pool_ready_s']:.2f} s after spawn")

        async def run_all() -> None:
            from broker_client import AsyncClient

            async with AsyncClient(server.url, timeout=1800) as client:
                await launch_at_ready(client, models[0], paths[models[0]], results, log)
                for name in models:
                    await bench_model(
                        client,
                        name,
                        paths[name],
                        workload,
                        concurrency,
                        args.quick,
                        results,
                        log,
                        meter,
                        args.max_wait,
                        args.retries,
                    )

        asyncio.run(run_all())
        if args.device == "cpu" and FEATURE_MODEL in paths and not args.no_features:
            bench_features(paths[FEATURE_MODEL], workload, feature_rounds, results, log)
    finally:
        stop.set()
        if pool.pid is not None:
            pool.join(60)
            if pool.is_alive():
                pool.kill()
        server.stop()
        shutil.rmtree(home, ignore_errors=True)

    print_report(results, workload, models, concurrency)
    print_features(results)
    if args.json:
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in results.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
