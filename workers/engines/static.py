"""Continuous batching with static shapes, so that each decode step can be a CUDA graph.

``StaticBatchingEngine`` is ``BatchingEngine`` (same API, request bookkeeping, sampling, detokenizer,
stop matching, threads) with another KV layout and decode step. ``BatchingEngine`` keeps the batch
in a left-padded ``DynamicCache`` whose shape changes every step: cheap on the CPU, but each step
launches a few hundred small kernels from Python and none of it can be captured. Here every tensor
a decode step touches has a fixed address and shape, so on CUDA the whole step (all layers, the
lm head and the greedy argmax) is captured once per batch-size bucket and replayed with one call.

KV layout (``SlotCache``): per layer, K and V tensors ``[max_batch_size, kv_heads, L, head_dim]``
allocated once, ``L`` = ``max_seq`` rounded up to 16. Slot ``s`` holds one request, position ``p``
of its sequence at index ``p``: a row's valid entries are exactly ``[0, n_ctx)``, so the attention
mask is ``arange(L) <= position`` and is computed inside the step from the position tensor.
Running requests always occupy slots ``0..n-1`` (row index == slot index), so bucket ``b`` works on
the views ``keys[:b]`` with no gather: when requests leave, survivors from the tail are copied into
the holes (only their valid prefix), which is cheap next to one decode step.

Step for bucket ``b`` (``_decode_step``): inputs are one ``[2 * b]`` slice of a device buffer (last
tokens, then positions). Rows ``n..b-1`` are padding: token 0 at position 0 of their own free slot,
attending to that one position so that they stay finite (a fully masked row would be NaN, and a NaN
written into a slot would poison its next occupant through ``0 * NaN`` in ``softmax @ V``). Each
layer's ``SlotLayer.update`` scatters the new K/V of every row at that row's position and returns
the full static K/V; transformers passes our 4-D mask through untouched (``masking_utils`` returns a
4-D mask as is) and its SDPA path runs GQA without ``repeat_kv`` for one-token queries.

Prefill stays eager and is ``BatchingEngine``'s: newcomers are prefilled together (left-padded,
within the prefill token budget) into a ``DynamicCache``, their first token is sampled from the
prefill logits, and ``_join`` rotates each row's K/V to start at index 0 and copies it into the
next free slots.

Graph runners: ``_runner(b)`` builds the runner of a bucket once and keeps it. On CUDA
(``use_graphs``) it warms the step up on a side stream, captures it into a ``torch.cuda.CUDAGraph``
(all buckets share one memory pool: only one replays at a time, and its outputs are read before
the next replay) and later only replays it; on
the CPU, or with ``use_graphs=False``, the same step function runs eagerly, so every piece of the
static logic except the capture itself is exercised without a GPU. ``capture_at_start`` builds all
buckets in ``start()`` (largest first, so the smaller graphs fit in the pool the largest made);
otherwise each is captured at its first use.

Sampling: greedy rows take the argmax computed inside the graph; when any row samples,
``BatchingEngine._sample`` runs on the step's logits (temperature, top-k, top-p vectorised over the
sampled rows on the device, one uniform per row from the request's own seeded generator), so a
seed gives the same tokens whatever else is batched, as in ``BatchingEngine``.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import types
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, StaticLayer

from .batching import _DEFAULT_PREFILL_TOKEN_BUDGET, BatchingEngine, SamplingParams, _Request

__all__ = ["SlotCache", "SlotLayer", "StaticBatchingEngine", "default_buckets"]

logger = logging.getLogger(__name__)

# Default cap on the static KV length: a model's own context (128k for Llama 3.2) times the slots
# would not fit in any GPU, and attention reads all L positions of every row each step.
_DEFAULT_MAX_SEQ_LEN = 2048
# The memory-efficient SDPA kernel wants the mask's last dimension aligned to 16; otherwise it pads
# the mask on every call.
_SEQ_ALIGN = 16
_GRAPH_WARMUP_STEPS = 2


def default_buckets(max_batch_size: int) -> list[int]:
    """Powers of two below ``max_batch_size``, then ``max_batch_size`` itself."""
    out = []
    b = 1
    while b < max_batch_size:
        out.append(b)
        b *= 2
    out.append(max_batch_size)
    return out


class SlotLayer(StaticLayer):
    """One layer's K/V for every slot, ``[slots, kv_heads, L, head_dim]``, allocated up front.

    ``update`` writes row ``r``'s single new key/value at ``positions[r]`` of slot ``r`` (the rows
    of a step are slots ``0..b-1``) and returns the static K/V of those slots, as views.
    """

    # Allocated in __init__ and never released, unlike the base class's lazily made tensors.
    keys: torch.Tensor  # type: ignore[assignment]
    values: torch.Tensor  # type: ignore[assignment]

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__(max_cache_len=keys.shape[2])
        self.keys = keys
        self.values = values
        self.device = keys.device
        self.batch_size, self.num_heads = keys.shape[0], keys.shape[1]
        self.k_head_dim, self.v_head_dim = keys.shape[3], values.shape[3]
        self.is_initialized = True
        # ``[b, 1]`` write positions of the step being run; set by ``SlotCache.begin_step``.
        self.positions: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Nothing to do: the tensors exist from construction on, at fixed addresses."""

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        positions = self.positions
        if positions is None or key_states.shape[2] != 1:
            raise RuntimeError("SlotLayer only takes one-token decode steps started by SlotCache.begin_step")
        rows = key_states.shape[0]
        keys, values = self.keys[:rows], self.values[:rows]
        # scatter_ along the position axis with a [b, heads, 1, dim] index: a device-side write,
        # no host sync, so it can be captured.
        index = positions.view(rows, 1, 1, 1)
        keys.scatter_(2, index.expand(key_states.shape), key_states)
        values.scatter_(2, index.expand(value_states.shape), value_states)
        return keys, values

    def get_seq_length(self) -> int:
        # Per-row lengths live in the engine; the engine always passes position_ids and a ready
        # 4-D mask, so nothing in the model needs one length for the batch.
        return 0


class SlotCache(Cache):
    """A transformers ``Cache`` of ``SlotLayer``s (see the module doc for the layout)."""

    layers: list[SlotLayer]  # type: ignore[assignment]

    def __init__(self, layers: list[SlotLayer]) -> None:
        super().__init__(layers=list(layers))

    @classmethod
    def allocate(
        cls, like: Sequence[tuple[torch.Tensor, torch.Tensor]], slots: int, length: int
    ) -> SlotCache:
        """Zeroed K/V shaped after one ``(keys, values)`` pair per layer (any batch and length):
        zeros, so that padding rows attending to a never-used position stay finite."""
        layers = []
        for keys, values in like:
            k_shape = (slots, keys.shape[1], length, keys.shape[3])
            v_shape = (slots, values.shape[1], length, values.shape[3])
            k = torch.zeros(k_shape, dtype=keys.dtype, device=keys.device)
            v = torch.zeros(v_shape, dtype=values.dtype, device=values.device)
            layers.append(SlotLayer(k, v))
        return cls(layers)

    def begin_step(self, positions: torch.Tensor) -> None:
        """``positions``: ``[b, 1]`` long, where each row's token of this step goes."""
        for layer in self.layers:
            layer.positions = positions

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in (layer.keys, layer.values))

    def load(self, first_slot: int, prefill: Any, lengths: Sequence[int]) -> None:
        """Copies a left-padded prefill cache (``[n, heads, width, dim]`` per layer, row ``i``'s
        ``lengths[i]`` tokens at its right end) into slots ``first_slot..first_slot+n-1``,
        starting at index 0."""
        n = len(lengths)
        width = prefill.layers[0].keys.shape[2]
        index: torch.Tensor | None = None
        if any(length != width for length in lengths):
            # Rotating each row left by its padding puts token p at index p; the padding lands
            # after the real tokens, where the mask hides it until decoding overwrites it.
            pad = torch.tensor([width - length for length in lengths], device=self.layers[0].device)
            index = (torch.arange(width, device=pad.device) + pad[:, None]) % width
        for layer, new in zip(self.layers, prefill.layers, strict=True):
            for dst, src in ((layer.keys, new.keys), (layer.values, new.values)):
                if index is not None:
                    idx = index.to(src.device)[:, None, :, None].expand(n, src.shape[1], width, src.shape[3])
                    src = src.gather(2, idx)
                dst[first_slot : first_slot + n, :, :width] = src

    def move(self, src: Sequence[int], dst: Sequence[int], length: int) -> None:
        """Copies the first ``length`` positions of slots ``src`` into slots ``dst``."""
        device = self.layers[0].device
        s = torch.tensor(list(src), device=device)
        d = torch.tensor(list(dst), device=device)
        for layer in self.layers:
            # The right-hand side is gathered into a new tensor before the write: overlapping
            # source and destination sets would still be safe.
            layer.keys[d, :, :length] = layer.keys[s, :, :length]
            layer.values[d, :, :length] = layer.values[s, :, :length]


class DecodeRunner(Protocol):
    """Runs the decode step of one bucket: ``run()`` returns ``(logits [b, V], argmax [b])``,
    valid until the next ``run`` of any runner."""

    bucket: int
    kind: str
    calls: int

    def run(self) -> tuple[torch.Tensor, torch.Tensor]: ...


_Step = Callable[[int], tuple[torch.Tensor, torch.Tensor]]


class _EagerRunner:
    kind = "eager"

    def __init__(self, bucket: int, step: _Step) -> None:
        self.bucket = bucket
        self.calls = 0
        self._step = step

    def run(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        return self._step(self.bucket)


class _GraphRunner:
    """The step of one bucket captured as a CUDA graph; its inputs and outputs are the static
    buffers the step reads and the tensors its capture produced."""

    kind = "cuda-graph"

    def __init__(self, bucket: int, step: _Step, pool: Any) -> None:
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


class StaticBatchingEngine(BatchingEngine):
    """``BatchingEngine`` over a static slot KV cache with bucketed, CUDA-graph decode steps.

    Options beyond ``BatchingEngine``'s:

    * ``max_seq_len``: positions per slot; ``context_length`` becomes ``min(context_length,
      max_seq_len)`` and a request needs ``len(prompt) + max_tokens <= context_length``.
    * ``use_graphs``: capture decode steps as CUDA graphs (default: when the model is on CUDA).
    * ``capture_at_start``: build every bucket's runner in ``start()`` instead of at first use.
    * ``buckets``: decode batch sizes (default powers of two, and ``max_batch_size``).

    The model must use full attention in every layer (no sliding window shorter than the cache)
    through ``sdpa`` or ``eager`` attention, the two that honour a ready 4-D mask.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        max_batch_size: int = 32,
        context_length: int | None = None,
        eos_token_ids: Iterable[int] | None = None,
        prefill_token_budget: int = _DEFAULT_PREFILL_TOKEN_BUDGET,
        max_seq_len: int = _DEFAULT_MAX_SEQ_LEN,
        use_graphs: bool | None = None,
        capture_at_start: bool = False,
        buckets: Iterable[int] | None = None,
    ) -> None:
        super().__init__(
            model,
            tokenizer,
            max_batch_size=max_batch_size,
            context_length=context_length,
            eos_token_ids=eos_token_ids,
            prefill_token_budget=prefill_token_budget,
        )
        if max_seq_len <= 1:
            raise ValueError(f"max_seq_len must be at least 2, got {max_seq_len}")
        self.model_context_length = self.context_length
        self.max_seq_len = int(max_seq_len)
        self.max_seq = min(self.context_length, self.max_seq_len)
        # What this engine can serve: callers that check context_length see the real limit.
        self.context_length = self.max_seq

        text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        attn = getattr(text, "_attn_implementation", None)
        if attn not in ("sdpa", "eager"):
            raise ValueError(
                f"StaticBatchingEngine needs 'sdpa' or 'eager' attention (they take a ready 4-D mask), "
                f"the model uses {attn!r}"
            )
        _check_full_attention(text, self.max_seq)
        # Eager attention adds the mask to the scores, so it needs an additive float mask;
        # SDPA takes the bool mask (True = attend) directly.
        self._additive_mask = attn == "eager"

        on_cuda = self._device.type == "cuda"
        if use_graphs and not on_cuda:
            raise ValueError(f"use_graphs=True needs a CUDA model; the model is on {self._device}")
        self._use_graphs = on_cuda if use_graphs is None else bool(use_graphs)
        self._capture_at_start = capture_at_start
        self._buckets = _normalise_buckets(buckets, max_batch_size)

        self._cache_len = -(-self.max_seq // _SEQ_ALIGN) * _SEQ_ALIGN
        self._kv = SlotCache.allocate(self._probe_kv_shapes(), max_batch_size, self._cache_len)
        dtype = self._kv.layers[0].keys.dtype
        self._kv_index = torch.arange(self._cache_len, device=self._device).view(1, 1, 1, -1)
        self._mask_on = torch.zeros((), dtype=dtype, device=self._device)
        self._mask_off = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=self._device)
        # Step inputs: tokens in [:b], positions in [b:2b] -- one contiguous copy per step.
        self._step_in = torch.zeros(2 * max_batch_size, dtype=torch.long, device=self._device)
        # Pinned on CUDA so that the copy is a true async DMA; filled through numpy, which is
        # far cheaper than building a tensor from Python lists.
        self._host_in = torch.zeros(2 * max_batch_size, dtype=torch.long, pin_memory=on_cuda)
        self._host_np = self._host_in.numpy()
        # Waiting on an event releases the GIL, unlike a blocking ``.tolist()``: the asyncio
        # loops can run while the GPU computes a step.
        self._done = torch.cuda.Event() if on_cuda else None

        self._runners: dict[int, DecodeRunner] = {}
        self._graph_pool: Any = None
        self._bucket_steps: Counter[int] = Counter()
        logger.info(
            "static KV cache: %d slots x %d positions, %.1f MiB; buckets %s; cuda graphs %s",
            max_batch_size,
            self._cache_len,
            self._kv.nbytes() / 2**20,
            self._buckets,
            "on" if self._use_graphs else "off",
        )

    # ------------------------------------------------------------------ public API

    def start(self) -> None:
        """Starts the generation thread; with ``capture_at_start`` first builds (captures) the
        decode runner of every bucket, largest first, so capture errors surface here."""
        with self._cond:
            fresh = not self._started and not self._closing
        if fresh and self._capture_at_start:
            with self._on_device(), torch.inference_mode():
                for bucket in reversed(self._buckets):
                    self._runner(bucket)
        super().start()

    def close(self) -> None:
        super().close()
        thread = self._thread
        if thread is None or not thread.is_alive():
            # The graphs hold their memory pool; nothing replays them any more.
            self._runners.clear()

    @property
    def buckets(self) -> tuple[int, ...]:
        return tuple(self._buckets)

    @property
    def kv_cache(self) -> SlotCache:
        """The static K/V (for inspection; the generation thread owns its contents)."""
        return self._kv

    @property
    def runners(self) -> Mapping[int, DecodeRunner]:
        """The decode runners built so far, by bucket (read-only snapshot)."""
        return types.MappingProxyType(dict(self._runners))

    @property
    def bucket_steps(self) -> Mapping[int, int]:
        """Decode steps run so far, by bucket."""
        return types.MappingProxyType(dict(self._bucket_steps))

    # ------------------------------------------------------------------ overrides

    def _validate(self, prompt: list[int], params: SamplingParams) -> None:
        if isinstance(params, SamplingParams) and prompt and params.max_tokens > 0:
            total = len(prompt) + params.max_tokens
            if total > self.max_seq:
                raise ValueError(
                    f"prompt of {len(prompt)} tokens + max_tokens {params.max_tokens} = {total} exceeds "
                    f"the static KV cache of {self.max_seq} positions per request (max_seq_len "
                    f"{self.max_seq_len}, model context {self.model_context_length})"
                )
        super()._validate(prompt, params)

    def _run(self) -> None:
        # The current CUDA device is per thread; streams and graphs are created on it.
        with self._on_device():
            super()._run()

    def _prefill(self, reqs: list[_Request]) -> tuple[Any, torch.Tensor, torch.Tensor]:
        out = super()._prefill(reqs)
        self._wait_device()
        return out

    def _join(self, reqs: list[_Request], cache: Any, mask: torch.Tensor) -> None:
        first = len(self._rows)
        if first + len(reqs) > self._max_batch:  # _admit never lets this happen
            raise RuntimeError(f"{first} + {len(reqs)} rows exceed the {self._max_batch} slots")
        self._kv.load(first, cache, [r.n_ctx for r in reqs])
        self._rows.extend(reqs)

    def _decode(self) -> None:
        rows = self._rows
        n = len(rows)
        bucket = self._buckets[bisect.bisect_left(self._buckets, n)]
        host = self._host_np
        host[:n] = [r.last_token for r in rows]
        host[bucket : bucket + n] = [r.n_ctx for r in rows]
        # Padding rows: token 0 at position 0 of their own (free) slot.
        host[n:bucket] = 0
        host[bucket + n : 2 * bucket] = 0
        self._forward_passes += 1
        try:
            self._step_in[: 2 * bucket].copy_(self._host_in[: 2 * bucket], non_blocking=True)
            logits, greedy = self._runner(bucket).run()
            self._wait_device()
            if all(r.greedy for r in rows):
                tokens = greedy[:n].tolist()
            else:
                tokens = self._sample(logits[:n], rows)
        except Exception as exc:
            # Every row's K/V of this step may be half written: those requests are lost, the
            # slots themselves are fine (a new occupant's prefill overwrites what it reads).
            logger.exception("decode step failed for %d request(s)", n)
            self._fail_rows(list(rows), exc)
            self._reset_batch()
            return
        self._bucket_steps[bucket] += 1
        finished = False
        for req, tok in zip(rows, tokens, strict=True):
            req.n_ctx += 1
            if self._advance(req, tok):
                finished = True
        if finished:
            self._keep_rows([i for i, r in enumerate(rows) if not r.done])

    def _keep_rows(self, keep: list[int]) -> None:
        """Keeps rows ``keep`` (indices into ``_rows``, increasing) and restores the invariant
        that the running rows are slots ``0..n-1``: survivors beyond ``n`` move into the holes."""
        if not keep:
            self._reset_batch()
            return
        rows = self._rows
        if len(keep) == len(rows):
            return
        n = len(keep)
        placed: list[_Request | None] = [None] * n
        movers: list[int] = []
        for i in keep:
            if i < n:
                placed[i] = rows[i]
            else:
                movers.append(i)
        if movers:
            holes = [j for j, r in enumerate(placed) if r is None]
            self._kv.move(movers, holes, max(rows[i].n_ctx for i in movers))
            for j, i in zip(holes, movers, strict=True):
                placed[j] = rows[i]
        self._rows = [r for r in placed if r is not None]

    # ------------------------------------------------------------------ decode step

    def _decode_step(self, bucket: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One decode forward of rows ``0..bucket-1`` from the static input buffer.

        Captured as a CUDA graph, so it must stay free of host synchronisation (``.item()``,
        ``.tolist()``, ``if tensor``) and of host data (``torch.tensor(list)``): everything comes
        from the buffers, and the mask is derived from the positions on the device.
        """
        ids = self._step_in[:bucket].view(bucket, 1)
        positions = self._step_in[bucket : 2 * bucket].view(bucket, 1)
        valid = self._kv_index <= positions.view(bucket, 1, 1, 1)  # [b, 1, 1, L]
        mask = torch.where(valid, self._mask_on, self._mask_off) if self._additive_mask else valid
        self._kv.begin_step(positions)
        kwargs: dict[str, Any] = {
            "input_ids": ids,
            "attention_mask": mask,
            "position_ids": positions,
            self._cache_kw: self._kv,
            "use_cache": True,
        }
        if self._keep_kw is not None:
            kwargs[self._keep_kw] = 1
        logits = self._model(**kwargs).logits[:, -1, :]
        return logits, logits.argmax(dim=-1)

    def _runner(self, bucket: int) -> DecodeRunner:
        runner = self._runners.get(bucket)
        if runner is None:
            runner = self._runners[bucket] = self._build_runner(bucket)
        return runner

    def _build_runner(self, bucket: int) -> DecodeRunner:
        if self._use_graphs:
            if self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()
            try:
                runner = _GraphRunner(bucket, self._decode_step, self._graph_pool)
            except Exception:
                # E.g. a model whose forward syncs with the host (dynamic RoPE scaling reads
                # max(position_ids)). Serving eagerly beats not serving; the log says why.
                logger.warning(
                    "CUDA graph capture of the batch-%d decode step failed; decoding eagerly from now on",
                    bucket,
                    exc_info=True,
                )
                self._use_graphs = False
            else:
                logger.debug("captured the decode step of bucket %d", bucket)
                return runner
        return _EagerRunner(bucket, self._decode_step)

    # ------------------------------------------------------------------ helpers

    def _probe_kv_shapes(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer K/V of a one-token forward: heads, head dims, dtype and device as the model
        really produces them (head_dim overrides, MLA-style K/V dims, per-layer devices)."""
        probe: Any = DynamicCache()
        ids = torch.zeros((1, 1), dtype=torch.long, device=self._device)
        with torch.inference_mode():
            self._model(input_ids=ids, use_cache=True, **{self._cache_kw: probe})
        if not probe.layers:
            raise ValueError("the model filled no KV cache layers in a forward pass")
        # Shapes only: ``allocate`` creates fresh (normal, not inference-mode) tensors.
        return [(layer.keys, layer.values) for layer in probe.layers]

    def _on_device(self) -> Any:
        if self._device.type == "cuda":
            return torch.cuda.device(self._device)
        return contextlib.nullcontext()

    def _wait_device(self) -> None:
        if self._done is not None:
            self._done.record()
            self._done.synchronize()


def _normalise_buckets(buckets: Iterable[int] | None, max_batch_size: int) -> list[int]:
    if buckets is None:
        return default_buckets(max_batch_size)
    out = sorted({int(b) for b in buckets if 0 < int(b) <= max_batch_size})
    if not out or out[-1] != max_batch_size:
        # Every batch size up to max_batch_size must fit in some bucket.
        out.append(max_batch_size)
    return out


def _check_full_attention(text_config: Any, max_seq: int) -> None:
    """Our mask is full causal attention over the slot. A sliding window at least as long as the
    cache is full attention too; anything else would need its own mask."""
    window = getattr(text_config, "sliding_window", None)
    if not getattr(text_config, "use_sliding_window", True):
        window = None
    layer_types = getattr(text_config, "layer_types", None)
    other = sorted({t for t in layer_types or () if t not in ("full_attention", "sliding_attention")})
    if other:
        raise ValueError(f"StaticBatchingEngine supports attention layers only; the model has {other}")
    sliding = "sliding_attention" in (layer_types or ()) or (layer_types is None and window)
    if sliding and (not window or window < max_seq):
        raise ValueError(
            f"the model has sliding-window attention (window {window}) shorter than max_seq {max_seq}; "
            "pass max_seq_len <= the window"
        )
