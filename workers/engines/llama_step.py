"""The decode forward of a Llama-shaped model on the CPU, without transformers' modules.

The static engine's eager decode step (``static.SlotStep``) calls the model: a forward through
transformers' modules runs, per layer, a dozen ``nn.Module`` calls, the attention-interface
lookup, the cache's ``update`` and about sixty ATen ops. On SmolLM2-135M at one row that
Python and dispatch took more than half of a step: with torch's 8-bit linears on one thread
the linears were 7.8 ms of a 31.5 ms step and SDPA 1.4 ms (``torch.profiler``, 2026-12-04).

:class:`LlamaDecode` is the same forward over the model's own weights, written out for one
token a row over the slot cache: the same ops in the same order, with three merges that change
no result bit (checked per layer and batch size on this machine, and by
``tests/engines/test_llama_step.py`` against the model's forward on every run):

* in fp32, q, k and v are one linear over their weights stacked by rows, and gate and up
  another: each output column is the same dot product (torch's int8 linears stay three and
  two: see ``_merged``);
* RoPE turns q and k together (one set of elementwise ops over their heads side by side);
* the RMSNorms are ``torch.rms_norm``, whose result on fp32 equals transformers'
  ``LlamaRMSNorm``'s op sequence.

The stacked weights are one tensor whose views the modules' weights become, so that prefill
(which runs the modules) and decode share the memory: the step holds no copy of any weight.

:func:`lean_step_unsupported` says why a model cannot take this path (another architecture, a
bias the merge cannot take, bf16 weights, eager attention); the engine then runs the model's
own forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["LlamaDecode", "lean_step_unsupported"]

# Architectures whose decoder layer is transformers' Llama layer (Mistral and Qwen2 are Llama
# with other defaults; Qwen2 has biases on q, k and v, which the merge stacks too).
_ARCHITECTURES = frozenset({"llama", "mistral", "qwen2"})


def _dynamic_linear() -> type | None:
    try:
        from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
    except ImportError:  # pragma: no cover - every torch the worker supports has it
        return None
    return DynamicLinear  # type: ignore[no-any-return]


def lean_step_unsupported(model: Any) -> str | None:
    """None when :class:`LlamaDecode` can run ``model``'s decode; otherwise why not."""
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_type = getattr(text, "model_type", None)
    if model_type not in _ARCHITECTURES:
        return f"model_type {model_type!r} is not one of {sorted(_ARCHITECTURES)}"
    if getattr(text, "_attn_implementation", None) != "sdpa":
        return f"attention {getattr(text, '_attn_implementation', None)!r} is not 'sdpa'"
    if getattr(text, "hidden_act", None) != "silu":
        return f"hidden_act {getattr(text, 'hidden_act', None)!r} is not 'silu'"
    if getattr(text, "pretraining_tp", 1) != 1:
        return f"pretraining_tp {text.pretraining_tp} is not 1"
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if inner is None or layers is None or getattr(inner, "rotary_emb", None) is None:
        return "the model has no model.layers and model.rotary_emb"
    embed = model.get_input_embeddings()
    if not isinstance(embed, torch.nn.Embedding) or embed.weight.dtype != torch.float32:
        return "the input embedding is not an fp32 nn.Embedding"
    if embed.weight.device.type != "cpu":
        return f"the model is on {embed.weight.device}, not the CPU"
    for index, layer in enumerate(layers):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None:
            return f"layer {index} is not a Llama layer (self_attn and mlp)"
        for owner, names in (
            (attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
            (mlp, ("gate_proj", "up_proj", "down_proj")),
        ):
            for name in names:
                module = getattr(owner, name, None)
                why = "it is missing" if module is None else _linear_unsupported(module)
                if why is not None:
                    return f"layer {index}'s {name}: {why}"
        if any(hasattr(attn, n) for n in ("q_norm", "k_norm")):
            return f"layer {index} normalises q and k (not a Llama layer)"
        qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
        if len({_has_bias(m) for m in qkv}) > 1 or _has_bias(attn.o_proj):
            return f"layer {index}: q/k/v biases differ, or o_proj has one"
        if any(_has_bias(getattr(mlp, n)) for n in ("gate_proj", "up_proj", "down_proj")):
            return f"layer {index}: the MLP has biases"
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            if type(norm).__name__ not in ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm"):
                return f"layer {index}: norm {type(norm).__name__} is not a Llama RMSNorm"
        if any(p.dtype != torch.float32 for p in layer.parameters()):
            return f"layer {index} has weights that are not fp32"
    head = model.get_output_embeddings()
    why = "it is missing" if head is None else _linear_unsupported(head)
    return None if why is None else f"the output head: {why}"


def _has_bias(module: Any) -> bool:
    bias = module.bias
    return (bias() if callable(bias) else bias) is not None


@dataclass(frozen=True)
class _Linear:
    """One linear as the step calls it: fp32 ``F.linear`` or torch's dynamic int8 op."""

    weight: torch.Tensor | None
    bias: torch.Tensor | None
    packed: Any = None
    reduce_range: bool = False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return torch.ops.quantized.linear_dynamic(x, self.packed, self.reduce_range)  # type: ignore[no-any-return]
        assert self.weight is not None  # an fp32 linear has its weight
        return F.linear(x, self.weight, self.bias)


def _reduce_range(module: Any) -> bool:
    """The input range ``module``'s own forward asks fbgemm for: all 8 bits in the full-range
    class of workers/loading/cpu_int8.py (a CPU with VNNI), 7 in torch's own (version 4 on)."""
    if _is_full_range(module):
        return False
    version = getattr(module, "version", None)
    return version is not None and version >= 4


def _is_full_range(module: Any) -> bool:
    from ..loading.cpu_int8 import full_range_class

    return type(module) is full_range_class()


def _linear_unsupported(module: Any) -> str | None:
    if type(module) is torch.nn.Linear:
        return None if module.weight.dtype == torch.float32 else f"its weights are {module.weight.dtype}"
    dynamic = _dynamic_linear()
    if dynamic is not None and (type(module) is dynamic or _is_full_range(module)):
        dtype = module._packed_params.dtype
        return None if dtype == torch.qint8 else f"a dynamic linear of {dtype}"
    return f"a {type(module).__name__}, not an nn.Linear or torch's dynamic int8 linear"


def _plain(module: Any) -> _Linear:
    if type(module) is not torch.nn.Linear:
        return _Linear(None, None, module._packed_params._packed_params, _reduce_range(module))
    return _Linear(module.weight, module.bias)


class _Parts:
    """Linears over one input whose outputs are concatenated (int8: see ``_merged``)."""

    def __init__(self, parts: Sequence[_Linear]) -> None:
        self.parts = tuple(parts)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([part(x) for part in self.parts], dim=-1)


def _merged(modules: Sequence[Any]) -> _Linear | _Parts:
    """One linear over ``modules``' weights stacked by output rows, for fp32 (the modules'
    weights become views of the stacked tensor: no copy); int8 linears stay separate.

    Stacked int8 copies (torch's packed weights cannot be sliced, and prefill runs the modules)
    made SmolLM2's 8-bit step 7-16 % faster at buckets 1-16 (21.4 against 24.9 ms at one row,
    one thread) for 66 MiB more, two thirds of the int8 layers' size: not worth it for a model
    whose point is its memory."""
    if any(type(m) is not torch.nn.Linear for m in modules):
        return _Parts([_plain(m) for m in modules])
    weight = torch.cat([m.weight.detach() for m in modules])
    bias = torch.cat([m.bias.detach() for m in modules]) if modules[0].bias is not None else None
    start = 0
    for m in modules:
        n = m.weight.shape[0]
        m.weight.data = weight[start : start + n]
        if bias is not None:
            m.bias.data = bias[start : start + n]
        start += n
    return _Linear(weight, bias)


@dataclass(frozen=True)
class _Layer:
    in_norm: torch.Tensor
    post_norm: torch.Tensor
    eps: float
    qkv: _Linear | _Parts
    o: _Linear
    gate_up: _Linear | _Parts
    down: _Linear


class LlamaDecode:
    """One decode forward (one token a row) of a Llama-shaped model over a slot cache.

    ``model`` must pass :func:`lean_step_unsupported`; building this stacks its q/k/v and
    gate/up weights (see the module doc). Call it with ``ids`` and ``positions`` ``[b, 1]``, the
    bool ``mask`` ``[b, 1, 1, W]`` (True: attend), the slot ``cache`` (``kv_slots.SlotCache``)
    and the attention ``window`` ``W`` (None: all positions); it writes each row's K/V at its
    position and returns the logits ``[b, V]`` of the last position.
    """

    def __init__(self, model: Any) -> None:
        reason = lean_step_unsupported(model)
        if reason is not None:
            raise ValueError(f"the lean decode step cannot run this model: {reason}")
        config = model.config
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        self._embed = model.get_input_embeddings().weight
        self._rotary = model.model.rotary_emb
        self.heads = int(text.num_attention_heads)
        self.kv_heads = int(getattr(text, "num_key_value_heads", None) or self.heads)
        first = model.model.layers[0].self_attn
        self.head_dim = int(getattr(first, "head_dim", text.hidden_size // self.heads))
        self._scaling = float(first.scaling)
        layers = []
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            layers.append(
                _Layer(
                    in_norm=layer.input_layernorm.weight,
                    post_norm=layer.post_attention_layernorm.weight,
                    eps=float(layer.input_layernorm.variance_epsilon),
                    qkv=_merged([attn.q_proj, attn.k_proj, attn.v_proj]),
                    o=_plain(attn.o_proj),
                    gate_up=_merged([mlp.gate_proj, mlp.up_proj]),
                    down=_plain(mlp.down_proj),
                )
            )
        self._layers = tuple(layers)
        self._intermediate = int(model.model.layers[0].mlp.gate_proj.out_features)
        norm = model.model.norm
        self._norm = (norm.weight, float(norm.variance_epsilon))
        self._head = _plain(model.get_output_embeddings())

    def __call__(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        cache: Any,
        window: int | None,
    ) -> torch.Tensor:
        b = ids.shape[0]
        heads, kv_heads, dim = self.heads, self.kv_heads, self.head_dim
        qk_heads = heads + kv_heads
        hidden = F.embedding(ids, self._embed)  # [b, 1, H]
        cos, sin = self._rotary(hidden, positions)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [b, 1, 1, d]: over every head
        half = dim // 2
        index = positions.view(b, 1, 1, 1)
        for layer, kv in zip(self._layers, cache.layers, strict=True):
            x = torch.rms_norm(hidden, (hidden.shape[-1],), layer.in_norm, layer.eps)
            qkv = layer.qkv(x).view(b, 1, qk_heads + kv_heads, dim).transpose(1, 2)
            qk = qkv[:, :qk_heads]
            # transformers' apply_rotary_pos_emb: x * cos + rotate_half(x) * sin.
            turned = torch.cat((-qk[..., half:], qk[..., :half]), dim=-1)
            qk = qk * cos + turned * sin
            keys, values = kv.keys[:b], kv.values[:b]
            k, v = qk[:, heads:], qkv[:, qk_heads:]
            keys.scatter_(2, index.expand(k.shape), k)
            values.scatter_(2, index.expand(v.shape), v)
            if window is not None:
                keys, values = keys[:, :, :window], values[:, :, :window]
            # transformers' SDPA path for one query: the query heads grouped by K/V head.
            q = qk[:, :heads].reshape(b, kv_heads, heads // kv_heads, dim)
            attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self._scaling)
            hidden = hidden + layer.o(attn.reshape(b, 1, heads * dim))
            x = torch.rms_norm(hidden, (hidden.shape[-1],), layer.post_norm, layer.eps)
            gate, up = layer.gate_up(x).split(self._intermediate, dim=-1)
            hidden = hidden + layer.down(F.silu(gate) * up)
        weight, eps = self._norm
        hidden = torch.rms_norm(hidden, (hidden.shape[-1],), weight, eps)
        return self._head(hidden[:, -1, :])
