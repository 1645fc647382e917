"""8-bit weights on the CPU: torch's dynamic int8 linear layers (fbgemm / onednn through the
``x86`` quantized engine) over every ``nn.Linear``, the output head included.

Each linear keeps int8 weights with one scale per output row (per-channel, symmetric); its
input is quantized to uint8 per call over the whole ``[rows, features]`` tensor, so a row's
result depends on the other rows of its batch (a single stream is exact against the same model
in ``generate``; batched rows may round differently). Everything else (the embedding, norms,
attention, the KV cache) stays fp32.

Measured on SmolLM2-135M-Instruct, 2 cores (AVX512 with VNNI), transformers ``generate``, 32
greedy tokens, batch 1, load average 0-3, 2026-12-02, warm, CPU ms a token:

    fp32 163; this path 58 (2.8x); per-tensor weights 66-72; torch's default 7-bit input range
    (reduce_range) 62; fp16 weights (fbgemm's fp16 dynamic linear) 75;
    bitsandbytes 8-bit 223 (``MatMul8bitLt`` casts to fp16 on the CPU and warns every call);
    bitsandbytes 4-bit nf4 103 (so "4-bit" stays bitsandbytes: faster than fp32, half of int8's
    memory, and torch has no usable 4-bit CPU kernel: ``_weight_int4pack_mm`` is slower than fp32)

Greedy agreement with fp32 over six short chat prompts, 24 tokens: int8 leaves fp32's tokens
after 0-9 of them (a 135M model is fragile; with the 7-bit input range it also lost "Paris" on
one prompt, which the full range keeps), fp16 weights keep all 24.

``torch.ao.quantization`` is deprecated in favour of torchao but works in torch 2.13 (it prints
a deprecation note once); see docs/benchmarks.md for torchao on this CPU.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

__all__ = ["full_range_class", "int8_linear_bytes", "quantize_cpu_int8"]

# Per output row of a per-channel quantized weight: a float64 scale and an int64 zero point
# (torch keeps both at 8 bytes), and fbgemm's packed copy keeps an int32 column offset.
_PER_ROW_BYTES = 8 + 8 + 4


def _has_vnni() -> bool:
    """Whether the CPU multiplies u8 x s8 into int32 without int16 saturation (VNNI): then the
    input may use the full 8-bit range; without it fbgemm needs torch's 7-bit ``reduce_range``."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    return "avx512_vnni" in flags or "avx_vnni" in flags
    except OSError:
        pass
    return False


@functools.cache
def full_range_class() -> type:
    """torch's dynamic int8 linear with the full 8-bit input range (see ``_has_vnni``): one
    class for the process, so that other code can tell its instances by type."""
    import torch
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    class FullRangeLinear(DynamicLinear):  # type: ignore[misc]
        """torch's dynamic int8 linear with the full 8-bit input range (see ``_has_vnni``)."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y: torch.Tensor = torch.ops.quantized.linear_dynamic(x, self._packed_params._packed_params, False)
            return y.to(x.dtype)

    return FullRangeLinear


def _untie_output(model: Any) -> None:
    """Give the output head its own copy of a tied embedding: the embedding stays fp32 (a
    lookup needs no matmul) and the copy is what gets quantized."""
    import torch

    head = model.get_output_embeddings()
    embed = model.get_input_embeddings()
    if head is None or embed is None or head.weight is not embed.weight:
        return
    copy = torch.nn.Linear(head.in_features, head.out_features, bias=head.bias is not None)
    copy.weight = torch.nn.Parameter(embed.weight.detach().clone(), requires_grad=False)
    if head.bias is not None:
        copy.bias = torch.nn.Parameter(head.bias.detach().clone(), requires_grad=False)
    model.set_output_embeddings(copy)
    for config in {id(c): c for c in (model.config, _text_config(model.config))}.values():
        if hasattr(config, "tie_word_embeddings"):
            config.tie_word_embeddings = False


def _text_config(config: Any) -> Any:
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def quantize_cpu_int8(model: Any) -> Any:
    """Replace every ``nn.Linear`` of an fp32 CPU ``model`` by a dynamic int8 one, in place
    (returns the model). A tied output head is untied first (:func:`_untie_output`)."""
    import torch

    _untie_output(model)
    with warnings.catch_warnings():
        # torch.ao's deprecation notes (torchao is the successor) and torch.jit's, which its
        # quantized modules still use: known, and nothing a user can act on.
        warnings.filterwarnings("ignore", message=".*deprecat.*")
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        quantize_dynamic(
            model, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True
        )
    if _has_vnni():
        from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

        full_range = full_range_class()
        for module in model.modules():
            if type(module) is DynamicLinear:
                module.__class__ = full_range
    return model


def int8_linear_bytes(model: Any) -> int:
    """Bytes of the dynamic int8 linears' packed weights: 1 per weight, the per-row scale and
    zero point, and the fp32 bias. Their weights are no parameters, so
    ``get_memory_footprint()`` misses them."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    total = 0
    for module in model.modules():
        if isinstance(module, DynamicLinear):
            rows, features = module.out_features, module.in_features
            total += rows * features + rows * _PER_ROW_BYTES
            bias = module.bias()
            if bias is not None:
                total += bias.numel() * bias.element_size()
    return total
