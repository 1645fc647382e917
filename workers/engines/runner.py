"""Runners: how the model's forward passes run.

:class:`ModelRunner` runs one Hugging Face causal LM eagerly and knows its calling conventions
(the cache keyword, ``logits_to_keep``, whether a ready 4-D mask may skip transformers' mask
builder, its device and vocabulary). Both LLM engines prefill through it; the batching engine's
decode step is one more eager forward.

The static engine's decode step works on fixed buffers, so it can run as a replay: a
:class:`DecodeRunner` runs the step of one batch-size bucket, either eagerly
(:class:`EagerRunner`, on the CPU or without graphs) or captured as a CUDA graph
(:class:`GraphRunner`); :class:`BucketRunners` builds each bucket's runner once, falling back to
eager when a capture fails. Another kind of runner (a ``torch.compile``'d step) is one more class
with ``run()`` and one more branch in :meth:`BucketRunners.build`.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import torch
from transformers import DynamicCache

from .kv_padded import PaddedPrefill, left_padded

__all__ = [
    "BucketRunners",
    "DecodeRunner",
    "EagerRunner",
    "GraphRunner",
    "ModelRunner",
    "default_eos",
    "model_device",
]

logger = logging.getLogger(__name__)

_GRAPH_WARMUP_STEPS = 2


class ModelRunner:
    """Eager forwards of one causal LM; counts them for the engine's statistics."""

    def __init__(self, model: Any) -> None:
        self.model = model
        config = model.config
        self.config = config
        self.text_config: Any = config.get_text_config() if hasattr(config, "get_text_config") else config
        embeddings = model.get_input_embeddings()
        self.vocab_size = int(getattr(embeddings, "num_embeddings", config.vocab_size))
        self.device = model_device(model)
        params = inspect.signature(model.forward).parameters
        # transformers 5.x renamed ``past_key_values`` to ``cache``; remote-code models may not have.
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.keep_kw: str | None = next(
            (k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None
        )
        # For one query per row the SDPA mask is just the padding mask; handing it over ready
        # skips transformers' mask builder, ~15% of a small model's decode step on CPU.
        self.decode_mask_4d = _plain_sdpa(config)
        # Every model forward since start, prefill and decode, replays included.
        self.forward_passes = 0

    def context_length(self, requested: int | None) -> int:
        """``requested``, or the model's own context; ValueError when neither is positive."""
        context = requested
        if context is None:
            context = getattr(self.config, "max_position_embeddings", None)
        if not context or context <= 0:
            raise ValueError(
                f"context_length must be positive, got {context!r}; pass it explicitly "
                "when the model config has no max_position_embeddings"
            )
        return int(context)

    def on_device(self) -> Any:
        """Makes the model's CUDA device current (it is per thread; streams and graphs are
        created on it); nothing elsewhere."""
        if self.device.type == "cuda":
            return torch.cuda.device(self.device)
        return contextlib.nullcontext()

    def prefill(self, prompts: Sequence[Sequence[int]], *, all_logits: bool = False) -> PaddedPrefill:
        """One forward over ``prompts`` left-padded together, into a fresh ``DynamicCache``;
        ``all_logits`` keeps every position's logits (a prompt's logprobs), not the last only."""
        input_ids, mask, position_ids = left_padded(prompts, self.device)
        cache: Any = DynamicCache()
        kwargs: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": mask,
            "position_ids": position_ids,
            self.cache_kw: cache,
            "use_cache": True,
        }
        if self.keep_kw is not None and not all_logits:
            kwargs[self.keep_kw] = 1  # only the last position's logits are needed
        self.forward_passes += 1
        out = self.model(**kwargs)
        prefill = PaddedPrefill(cache, mask, out.logits[:, -1, :], out.logits if all_logits else None)
        width = input_ids.shape[1]
        if any(len(p) < width for p in prompts):
            prefill.zero_padding()
        return prefill

    def decode(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor, cache: Any
    ) -> torch.Tensor:
        """One eager decode forward (``[B, 1]`` tokens and positions, ``[B, L]`` bool mask);
        the logits ``[B, V]``."""
        kwargs: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": mask[:, None, None, :] if self.decode_mask_4d else mask,
            "position_ids": position_ids,
            self.cache_kw: cache,
            "use_cache": True,
        }
        self.forward_passes += 1
        return self.model(**kwargs).logits[:, -1, :]  # type: ignore[no-any-return]

    def probe_kv_shapes(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer K/V of a one-token forward: heads, head dims, dtype and device as the model
        really produces them (head_dim overrides, MLA-style K/V dims, per-layer devices)."""
        probe: Any = DynamicCache()
        ids = torch.zeros((1, 1), dtype=torch.long, device=self.device)
        with torch.inference_mode():
            self.model(input_ids=ids, use_cache=True, **{self.cache_kw: probe})
        if not probe.layers:
            raise ValueError("the model filled no KV cache layers in a forward pass")
        # Shapes only: the static cache allocates fresh (normal, not inference-mode) tensors.
        return [(layer.keys, layer.values) for layer in probe.layers]


# ----------------------------------------------------------------------------- bucketed runners

# The decode step of one bucket: ``(logits [b, V], argmax [b])`` from fixed input buffers.
Step = Callable[[int], tuple[torch.Tensor, torch.Tensor]]


class DecodeRunner(Protocol):
    """Runs the decode step of one bucket: ``run()`` returns ``(logits [b, V], argmax [b])``,
    valid until the next ``run`` of any runner."""

    bucket: int
    kind: str
    calls: int

    def run(self) -> tuple[torch.Tensor, torch.Tensor]: ...


class EagerRunner:
    """The step of one bucket, run as plain Python and kernels each time."""

    kind = "eager"

    def __init__(self, bucket: int, step: Step) -> None:
        self.bucket = bucket
        self.calls = 0
        self._step = step

    def run(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        return self._step(self.bucket)


class GraphRunner:
    """The step of one bucket captured as a CUDA graph; its inputs and outputs are the static
    buffers the step reads and the tensors its capture produced."""

    kind = "cuda-graph"

    def __init__(self, bucket: int, step: Step, pool: Any) -> None:
        self.bucket = bucket
        self.calls = 0
        # Warm-up on a side stream, as the CUDA graph docs ask: the first calls allocate
        # workspaces (cuBLAS, SDPA) and pick kernels, none of which may happen during capture.
        # Running the step is harmless whenever this happens: it writes the K/V the coming
        # replay writes too, or (at start) K/V of free slots.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(_GRAPH_WARMUP_STEPS):
                step(bucket)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: CUDA work of other threads (another engine, an embedding model) during
        # the capture must not invalidate it.
        with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
            self._outputs = step(bucket)

    def run(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        self.graph.replay()
        return self._outputs


class BucketRunners:
    """The decode runner of every bucket, each built once: at its first use, or all of them in
    :meth:`build_all`. With ``use_graphs`` the buckets are CUDA graphs sharing one memory pool
    (only one replays at a time, and its outputs are read before the next replay)."""

    def __init__(self, step: Step, *, use_graphs: bool) -> None:
        self._step = step
        self.use_graphs = use_graphs
        self._runners: dict[int, DecodeRunner] = {}
        self._pool: Any = None

    def get(self, bucket: int) -> DecodeRunner:
        runner = self._runners.get(bucket)
        if runner is None:
            runner = self._runners[bucket] = self.build(bucket)
        return runner

    def build_all(self, buckets: Iterable[int]) -> None:
        """Builds the runners of ``buckets`` now, largest first, so that the smaller graphs fit
        in the pool the largest made."""
        for bucket in sorted(buckets, reverse=True):
            self.get(bucket)

    def build(self, bucket: int) -> DecodeRunner:
        if self.use_graphs:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            try:
                runner = GraphRunner(bucket, self._step, self._pool)
            except Exception:
                # E.g. a model whose forward syncs with the host (dynamic RoPE scaling reads
                # max(position_ids)). Serving eagerly beats not serving; the log says why.
                logger.warning(
                    "CUDA graph capture of the batch-%d decode step failed; decoding eagerly from now on",
                    bucket,
                    exc_info=True,
                )
                self.use_graphs = False
            else:
                logger.debug("captured the decode step of bucket %d", bucket)
                return runner
        return EagerRunner(bucket, self._step)

    def snapshot(self) -> Mapping[int, DecodeRunner]:
        """The runners built so far, by bucket (read-only)."""
        return types.MappingProxyType(dict(self._runners))

    def clear(self) -> None:
        """Drops every runner (the graphs hold their memory pool)."""
        self._runners.clear()


# ----------------------------------------------------------------------------- model facts


def default_eos(model: Any, tokenizer: Any) -> frozenset[int]:
    """The eos ids of the model's generation config and of its tokenizer."""
    ids: set[int] = set()
    gen_config = getattr(model, "generation_config", None)
    for source in (getattr(gen_config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if source is None:
            continue
        if isinstance(source, int):
            ids.add(source)
        else:
            ids.update(int(i) for i in source)
    return frozenset(ids)


def model_device(model: Any) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    with contextlib.suppress(StopIteration):
        return next(model.parameters()).device
    return torch.device("cpu")


def _plain_sdpa(config: Any) -> bool:
    """True when every layer is full causal attention through SDPA, so that a [B, 1, 1, L] bool
    mask is exactly what transformers would build for a one-token query. Sliding-window or other
    layer types need transformers' own mask functions."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text, "_attn_implementation", None) != "sdpa":
        return False
    layer_types = getattr(text, "layer_types", None)
    if layer_types is not None:
        return all(t == "full_attention" for t in layer_types)
    if getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True):
        return False
    return True
