"""What a replica needs in memory, estimated before anything is downloaded (pure: no I/O).

The registry knows a model only by its definition: ``model_size_in_billions``, the
quantization, the context length, and where it will run. From that:

    weights   = parameters x bytes per parameter
                  none   2 B (fp16/bf16) on a GPU, 4 B (fp32) on the CPU
                  8-bit  1 B;   4-bit  0.5 B   (bitsandbytes)
                  8-bit on the CPU (workers/loading/cpu_int8.py, torch's int8 linears): 1 B
                  + 4 B per embedding parameter, which stays fp32, with an int8 copy for a
                  tied output head; embedding = min(128k x hidden, parameters / 4) (SmolLM2's
                  28M of 135M, Llama 3's 525M of 8B, rounded up)
    overhead  = 15 % of the weights (activations, buffers, allocator slack, the layers that
                quantization keeps in 16 bits) + 512 MiB of CUDA context on a GPU
    KV cache  = bytes per token x tokens
                  bytes per token = 2 (K and V) x layers x hidden / 4 x dtype bytes. The shape
                  comes from the size, for a decoder whose width is 128 x its depth
                  (12 x layers x hidden^2 = parameters, within 10 % for Llama 2/3 and Qwen); /4
                  assumes grouped-query attention with 4 query heads per KV head, as in most
                  current models (older multi-head models use more).
                  tokens on a GPU: min(context, 2048) x max_batch_size (default 32): the static
                  engine allocates its KV slots up front (workers/engines/static.py).
                  tokens on the CPU: max_batch_size x min(context, 256) + one full context.
                  Its static slots are allocated at 256 positions (workers/builder.py) and
                  grow with use, every slot to the longest row's length, as the left-padded
                  cache (cpu_kv="padded") grows to rows x the longest row: the growth is
                  counted as one long request, not as every slot at full context (which would
                  refuse a 1B model on a 16 GiB laptop for a worst case that needs 32 long
                  requests' worth of memory to be at risk).

A ``ggufv2`` spec runs on llama.cpp (workers/engines/llama_cpp.py), on the CPU:

    weights   = parameters x the GGUF type's bits per weight / 8 (llama.cpp's block layouts:
                Q4_0 4.5, Q4_1 5, Q8_0 8.5, F16 16; the K-quant mixes as llama-quantize reports
                them for a 7B model, Q4_K_M 4.89), which is the file's size within a few percent
                (the file is memory-mapped: its pages are the weights' memory) + 5 %
    KV cache  = the same bytes per token in f16 x every sequence's cells: the engine gives each
                of its max_batch_size sequences a whole context (rounded up to 256 positions),
                allocated when the replica starts
    buffers   = 128 MiB (llama.cpp's compute buffers for a 512-token batch and the logits)

Embedding models need their weights and the overhead only. ``echo:`` models need nothing (or
the bytes their ``memory=`` option names: the echo engine's drill of memory pressure), and a
spec without ``model_size_in_billions`` is estimated at 0 (placed by free memory alone).

It is an estimate, meant to refuse at once what cannot fit and to choose where things fit; the
worker's own load still fails cleanly (with the loader's error) if the estimate was too low.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Mapping
from typing import Any

__all__ = [
    "CPU_INITIAL_SEQ",
    "DEFAULT_BATCH",
    "GIB",
    "estimate_bytes",
    "format_bytes",
    "gguf_bits_per_weight",
]

GIB = 1 << 30
DEFAULT_BATCH = 32
_STATIC_MAX_SEQ = 2048
# The CPU's static KV slots at start: workers.builder.CPU_INITIAL_SEQ (the registry does not
# import the worker).
CPU_INITIAL_SEQ = 256
_OVERHEAD = 0.15
_CUDA_CONTEXT = 512 << 20
_GQA = 4
_BYTES_PER_PARAM = {"4-bit": 0.5, "8-bit": 1.0}
# The largest vocabularies in use (Llama 3's 128,256 tokens), for the embedding's size.
_VOCAB_CEILING = 128_256
# Bits per weight of GGUF types (llama.cpp's ggml-common.h blocks; K-quant mixes as
# llama-quantize lists them). Unlisted names: the number in them + 1 (Q5_K_S ~ 6), else 8.5.
_GGUF_BITS = {
    "F32": 32.0,
    "F16": 16.0,
    "BF16": 16.0,
    "Q8_0": 8.5,
    "Q6_K": 6.56,
    "Q5_0": 5.5,
    "Q5_1": 6.0,
    "Q5_K_S": 5.54,
    "Q5_K_M": 5.69,
    "Q4_0": 4.5,
    "Q4_1": 5.0,
    "Q4_K_S": 4.58,
    "Q4_K_M": 4.89,
    "IQ4_XS": 4.25,
    "IQ4_NL": 4.5,
    "Q3_K_S": 3.5,
    "Q3_K_M": 3.91,
    "Q3_K_L": 4.27,
    "Q2_K": 2.96,
    "IQ3_XXS": 3.06,
    "IQ2_XXS": 2.06,
    "IQ2_XS": 2.31,
    "IQ1_S": 1.56,
}
_GGUF_KV_PAD = 256
_GGUF_BUFFERS = 128 << 20
_GGUF_OVERHEAD = 0.05


def _bytes_per_param(quantization: str, on_gpu: bool) -> float:
    if quantization in _BYTES_PER_PARAM:
        return _BYTES_PER_PARAM[quantization]
    return 2.0 if on_gpu else 4.0


def gguf_bits_per_weight(quantization: str) -> float:
    """Bits per weight of a GGUF type (``Q4_K_M``, ``q8_0``; see ``_GGUF_BITS``)."""
    name = quantization.upper()
    if name in _GGUF_BITS:
        return _GGUF_BITS[name]
    digits = "".join(c for c in name.split("_")[0] if c.isdigit())
    return float(digits) + 1 if digits else 8.5


def _gguf_bytes(parameters: float, quantization: str, context: int, batch: int) -> int:
    weights = parameters * gguf_bits_per_weight(quantization) / 8
    cells = -(-context // _GGUF_KV_PAD) * _GGUF_KV_PAD * batch
    kv = _kv_bytes_per_token(parameters, 2.0) * cells
    return int(weights * (1 + _GGUF_OVERHEAD) + kv + _GGUF_BUFFERS)


def _embedding_parameters(parameters: float) -> float:
    """The input embedding's share of ``parameters`` (the docstring's estimate)."""
    hidden = (parameters * 128 / 12) ** (1 / 3)
    return min(_VOCAB_CEILING * hidden, parameters / 4)


def _kv_bytes_per_token(parameters: float, dtype_bytes: float) -> float:
    hidden = (parameters * 128 / 12) ** (1 / 3)
    layers = hidden / 128
    return 2 * layers * hidden / _GQA * dtype_bytes


def estimate_bytes(
    spec: Mapping[str, Any],
    *,
    quantization: str,
    device_kind: str,
    model_type: str = "LLM",
    context_length: int | None = None,
    max_batch_size: int | None = None,
) -> int:
    """Bytes one replica of ``spec`` needs on a device of ``device_kind`` (``cuda`` or ``cpu``)."""
    uri = str(spec.get("model_uri") or "")
    if uri.strip().lower().startswith("echo:"):
        return _echo_memory(uri)
    size = spec.get("model_size_in_billions")
    if not size:
        return 0
    parameters = float(size) * 1e9
    if spec.get("model_format") == "ggufv2":
        # On the CPU wherever it is placed (the engine's llama.cpp has no GPU offload here).
        return _gguf_bytes(parameters, quantization, context_length or 2048, max_batch_size or DEFAULT_BATCH)
    on_gpu = device_kind != "cpu"
    weights = parameters * _bytes_per_param(quantization, on_gpu)
    if quantization == "8-bit" and not on_gpu:
        weights += 4 * _embedding_parameters(parameters)
    need = weights * (1 + _OVERHEAD) + (_CUDA_CONTEXT if on_gpu else 0)
    if model_type == "LLM":
        # The cache is kept in the compute dtype, whatever the weights' quantization.
        per_token = _kv_bytes_per_token(parameters, 2.0 if on_gpu else 4.0)
        context = context_length or 2048
        slots = max_batch_size or DEFAULT_BATCH
        if on_gpu:
            tokens = min(context, _STATIC_MAX_SEQ) * slots
        else:
            tokens = min(context, CPU_INITIAL_SEQ) * slots + context
        need += per_token * tokens
    return int(need)


def _echo_memory(uri: str) -> int:
    """The ``memory=`` option of an ``echo:`` URI (0 without one, or when it is not a number:
    the worker refuses such a URI with the option's name)."""
    query = uri.strip()[len("echo:") :].partition("?")[2]
    try:
        values = urllib.parse.parse_qs(query)
        return max(0, int(float(values.get("memory", ["0"])[-1])))
    except (ValueError, OverflowError):
        return 0


def format_bytes(n: float) -> str:
    """``12.3 GiB``, ``512 MiB``: how the registry's messages print sizes."""
    if n >= GIB:
        return f"{n / GIB:.1f} GiB"
    return f"{n / (1 << 20):.0f} MiB"
