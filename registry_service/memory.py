"""What a replica needs in memory, estimated before anything is downloaded (pure: no I/O).

The registry knows a model only by its definition: ``model_size_in_billions``, the
quantization, the context length, and where it will run. From that:

    weights   = parameters x bytes per parameter
                  none   2 B (fp16/bf16) on a GPU, 4 B (fp32) on the CPU
                  8-bit  1 B;   4-bit  0.5 B   (bitsandbytes)
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
                  tokens on the CPU: one full context; the dynamic cache grows with use.

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
    "DEFAULT_BATCH",
    "GIB",
    "estimate_bytes",
    "format_bytes",
]

GIB = 1 << 30
DEFAULT_BATCH = 32
_STATIC_MAX_SEQ = 2048
_OVERHEAD = 0.15
_CUDA_CONTEXT = 512 << 20
_GQA = 4
_BYTES_PER_PARAM = {"4-bit": 0.5, "8-bit": 1.0}


def _bytes_per_param(quantization: str, on_gpu: bool) -> float:
    if quantization in _BYTES_PER_PARAM:
        return _BYTES_PER_PARAM[quantization]
    return 2.0 if on_gpu else 4.0


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
    on_gpu = device_kind != "cpu"
    weights = parameters * _bytes_per_param(quantization, on_gpu)
    need = weights * (1 + _OVERHEAD) + (_CUDA_CONTEXT if on_gpu else 0)
    if model_type == "LLM":
        # The cache is kept in the compute dtype, whatever the weights' quantization.
        per_token = _kv_bytes_per_token(parameters, 2.0 if on_gpu else 4.0)
        context = context_length or 2048
        if on_gpu:
            tokens = min(context, _STATIC_MAX_SEQ) * (max_batch_size or DEFAULT_BATCH)
        else:
            tokens = context
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
