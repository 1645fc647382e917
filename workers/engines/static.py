"""The static engine: continuous batching with static shapes, so that each decode step can be a
CUDA graph.

``StaticBatchingEngine`` is :class:`~workers.engines.core.EngineCore` (same API, scheduler,
sampler, output processing, bridge) with :class:`SlotExecutor`: another KV layout and decode step.
The batching engine keeps the batch in a left-padded ``DynamicCache`` whose shape changes every
step: cheap on the CPU, but each step launches a few hundred small kernels from Python and none of
it can be captured. Here every tensor a decode step touches has a fixed address and shape, so on
CUDA the whole step (all layers, the lm head and the greedy argmax) is captured once per
batch-size bucket and replayed with one call.

KV layout: the static slots of ``kv_slots`` (row index == slot index, rows ``0..n-1``).

Step for bucket ``b`` (:class:`SlotStep`): inputs are one ``[2 * b]`` slice of a device buffer
(last tokens, then positions). Rows ``n..b-1`` are padding: token 0 at position 0 of their own free
slot, attending to that one position so that they stay finite (a fully masked row would be NaN,
and a NaN written into a slot would poison its next occupant through ``0 * NaN`` in
``softmax @ V``). Each layer's ``SlotLayer.update`` scatters the new K/V of every row at that row's
position and returns the full static K/V; transformers passes our 4-D mask through untouched
(``masking_utils`` returns a 4-D mask as is) and its SDPA path runs GQA without ``repeat_kv`` for
one-token queries.

Prefill stays eager and is the batching engine's: newcomers are prefilled together (left-padded,
within the prefill token budget) into a ``DynamicCache``, their first token is sampled from the
prefill logits, and the slot layout rotates each row's K/V to start at index 0 and copies it into
the next free slots.

Runners (``runner.py``): each bucket's runner is built once and kept. On CUDA (``use_graphs``) it
warms the step up on a side stream, captures it into a ``torch.cuda.CUDAGraph`` and later only
replays it; on the CPU, or with ``use_graphs=False``, the same step function runs eagerly, so
every piece of the static logic except the capture itself is exercised without a GPU.
``capture_at_start`` builds all buckets in ``start()`` (largest first, so the smaller graphs fit
in the pool the largest made); otherwise each is captured at its first use.

Sampling: greedy rows take the argmax computed inside the graph; when any row samples, the sampler
runs on the step's logits (temperature, top-k, top-p vectorised over the sampled rows on the
device, one uniform per row from the request's own seeded generator), so a seed gives the same
tokens whatever else is batched, as in the batching engine.
"""

from __future__ import annotations

import bisect
import logging
import types
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from .api import Engine
from .core import DEFAULT_PREFILL_TOKEN_BUDGET, EngineCore
from .kv_padded import PaddedPrefill
from .kv_slots import SEQ_ALIGN, SlotCache, SlotKV, SlotLayer
from .request import Request
from .runner import BucketRunners, DecodeRunner, ModelRunner

__all__ = [
    "SlotCache",
    "SlotExecutor",
    "SlotLayer",
    "SlotStep",
    "StaticBatchingEngine",
    "default_buckets",
]

logger = logging.getLogger(__name__)

# Default cap on the static KV length: a model's own context (128k for Llama 3.2) times the slots
# would not fit in any GPU, and attention reads all L positions of every row each step.
_DEFAULT_MAX_SEQ_LEN = 2048


def default_buckets(max_batch_size: int) -> list[int]:
    """Powers of two below ``max_batch_size``, then ``max_batch_size`` itself."""
    out = []
    b = 1
    while b < max_batch_size:
        out.append(b)
        b *= 2
    out.append(max_batch_size)
    return out


class SlotStep:
    """The decode step of rows ``0..b-1`` over the slot cache, from static input buffers.

    ``load`` fills the buffers for a step (host side); calling the step with a bucket runs the
    forward. The call is captured as a CUDA graph, so it stays free of host synchronisation
    (``.item()``, ``.tolist()``, ``if tensor``) and of host data (``torch.tensor(list)``):
    everything comes from the buffers, and the mask is derived from the positions on the device.
    """

    def __init__(self, runner: ModelRunner, kv: SlotCache, *, slots: int, additive_mask: bool) -> None:
        self._runner = runner
        self._kv = kv
        # Eager attention adds the mask to the scores, so it needs an additive float mask;
        # SDPA takes the bool mask (True = attend) directly.
        self._additive_mask = additive_mask
        device = runner.device
        dtype = kv.layers[0].keys.dtype
        cache_len = kv.layers[0].keys.shape[2]
        self._kv_index = torch.arange(cache_len, device=device).view(1, 1, 1, -1)
        self._mask_on = torch.zeros((), dtype=dtype, device=device)
        self._mask_off = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=device)
        # Step inputs: tokens in [:b], positions in [b:2b] -- one contiguous copy per step.
        self._step_in = torch.zeros(2 * slots, dtype=torch.long, device=device)
        on_cuda = device.type == "cuda"
        # Pinned on CUDA so that the copy is a true async DMA; filled through numpy, which is
        # far cheaper than building a tensor from Python lists.
        self._host_in = torch.zeros(2 * slots, dtype=torch.long, pin_memory=on_cuda)
        self._host_np = self._host_in.numpy()

    def load(self, rows: Sequence[Request], bucket: int) -> None:
        """Puts the rows' last tokens and positions into the input buffer of ``bucket``."""
        n = len(rows)
        host = self._host_np
        host[:n] = [r.last_token for r in rows]
        host[bucket : bucket + n] = [r.n_ctx for r in rows]
        # Padding rows: token 0 at position 0 of their own (free) slot.
        host[n:bucket] = 0
        host[bucket + n : 2 * bucket] = 0
        self._step_in[: 2 * bucket].copy_(self._host_in[: 2 * bucket], non_blocking=True)

    def __call__(self, bucket: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits [b, V], argmax [b])`` of one decode forward of rows ``0..bucket-1``."""
        runner = self._runner
        ids = self._step_in[:bucket].view(bucket, 1)
        positions = self._step_in[bucket : 2 * bucket].view(bucket, 1)
        valid = self._kv_index <= positions.view(bucket, 1, 1, 1)  # [b, 1, 1, L]
        mask = torch.where(valid, self._mask_on, self._mask_off) if self._additive_mask else valid
        self._kv.begin_step(positions)
        kwargs: dict[str, Any] = {
            "input_ids": ids,
            "attention_mask": mask,
            "position_ids": positions,
            runner.cache_kw: self._kv,
            "use_cache": True,
        }
        if runner.keep_kw is not None:
            kwargs[runner.keep_kw] = 1
        logits = runner.model(**kwargs).logits[:, -1, :]
        return logits, logits.argmax(dim=-1)


class SlotExecutor:
    """The static slots and their bucketed decode runners (an ``Executor`` of the core)."""

    def __init__(
        self,
        runner: ModelRunner,
        *,
        max_batch_size: int,
        max_seq: int,
        additive_mask: bool,
        use_graphs: bool,
        capture_at_start: bool,
        buckets: list[int],
    ) -> None:
        self._runner = runner
        self.buckets = buckets
        self._capture_at_start = capture_at_start
        cache_len = -(-max_seq // SEQ_ALIGN) * SEQ_ALIGN
        self.kv_cache = SlotCache.allocate(runner.probe_kv_shapes(), max_batch_size, cache_len)
        self._slots = SlotKV(self.kv_cache)
        self.step = SlotStep(runner, self.kv_cache, slots=max_batch_size, additive_mask=additive_mask)
        self.runners = BucketRunners(self.step, use_graphs=use_graphs)
        self.bucket_steps: Counter[int] = Counter()
        # Waiting on an event releases the GIL, unlike a blocking ``.tolist()``: the asyncio
        # loops can run while the GPU computes a step.
        self._done = torch.cuda.Event() if runner.device.type == "cuda" else None

    def prepare(self) -> None:
        if self._capture_at_start:
            self.runners.build_all(self.buckets)

    def release(self) -> None:
        # The graphs hold their memory pool; nothing replays them any more.
        self.runners.clear()

    def prefill(self, reqs: Sequence[Request]) -> PaddedPrefill:
        prefill = self._runner.prefill(
            [r.prompt for r in reqs], all_logits=any(r.params.prompt_logprobs is not None for r in reqs)
        )
        self._wait_device()
        return prefill

    def join(self, first: int, reqs: Sequence[Request], prefill: PaddedPrefill) -> None:
        self._slots.join(first, reqs, prefill)

    def decode(self, rows: Sequence[Request]) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(rows)
        bucket = self.buckets[bisect.bisect_left(self.buckets, n)]
        self._runner.forward_passes += 1
        self.step.load(rows, bucket)
        logits, greedy = self.runners.get(bucket).run()
        self._wait_device()
        self.bucket_steps[bucket] += 1
        return logits[:n], greedy[:n]

    def keep(self, rows: list[Request], keep: list[int]) -> list[Request]:
        return self._slots.keep(rows, keep)

    def reset(self) -> None:
        """Nothing to free. After a failed step every row's K/V of that step may be half
        written: those requests are lost (the core fails them), the slots themselves are fine,
        since a new occupant's prefill overwrites what it reads."""

    def _wait_device(self) -> None:
        if self._done is not None:
            self._done.record()
            self._done.synchronize()


class StaticBatchingEngine(EngineCore):
    """The engine core over a static slot KV cache with bucketed, CUDA-graph decode steps.

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
        prefill_token_budget: int = DEFAULT_PREFILL_TOKEN_BUDGET,
        max_seq_len: int = _DEFAULT_MAX_SEQ_LEN,
        use_graphs: bool | None = None,
        capture_at_start: bool = False,
        buckets: Iterable[int] | None = None,
    ) -> None:
        if max_batch_size <= 0:
            raise ValueError(f"max_batch_size must be positive, got {max_batch_size}")
        runner = ModelRunner(model)
        self.model_context_length = runner.context_length(context_length)
        if max_seq_len <= 1:
            raise ValueError(f"max_seq_len must be at least 2, got {max_seq_len}")
        self.max_seq_len = int(max_seq_len)
        self.max_seq = min(self.model_context_length, self.max_seq_len)

        attn = getattr(runner.text_config, "_attn_implementation", None)
        if attn not in ("sdpa", "eager"):
            raise ValueError(
                f"StaticBatchingEngine needs 'sdpa' or 'eager' attention (they take a ready 4-D mask), "
                f"the model uses {attn!r}"
            )
        _check_full_attention(runner.text_config, self.max_seq)

        on_cuda = runner.device.type == "cuda"
        if use_graphs and not on_cuda:
            raise ValueError(f"use_graphs=True needs a CUDA model; the model is on {runner.device}")
        self._slot_exec = SlotExecutor(
            runner,
            max_batch_size=max_batch_size,
            max_seq=self.max_seq,
            additive_mask=attn == "eager",
            use_graphs=on_cuda if use_graphs is None else bool(use_graphs),
            capture_at_start=capture_at_start,
            buckets=_normalise_buckets(buckets, max_batch_size),
        )
        super().__init__(
            runner,
            self._slot_exec,
            tokenizer,
            max_batch_size=max_batch_size,
            # What this engine can serve: callers that check context_length see the real limit.
            context_length=self.max_seq,
            limit_text=(
                f"the static KV cache of {self.max_seq} positions per request (max_seq_len "
                f"{self.max_seq_len}, model context {self.model_context_length})"
            ),
            eos_token_ids=eos_token_ids,
            prefill_token_budget=prefill_token_budget,
        )
        logger.info(
            "static KV cache: %d slots x %d positions, %.1f MiB; buckets %s; cuda graphs %s",
            max_batch_size,
            self.kv_cache.layers[0].keys.shape[2],
            self.kv_cache.nbytes() / 2**20,
            self.buckets,
            "on" if self._slot_exec.runners.use_graphs else "off",
        )

    @property
    def buckets(self) -> tuple[int, ...]:
        return tuple(self._slot_exec.buckets)

    @property
    def kv_cache(self) -> SlotCache:
        """The static K/V (for inspection; the generation thread owns its contents)."""
        return self._slot_exec.kv_cache

    @property
    def decode_step(self) -> SlotStep:
        """The decode step every bucket's runner runs (for inspection)."""
        return self._slot_exec.step

    @property
    def runners(self) -> Mapping[int, DecodeRunner]:
        """The decode runners built so far, by bucket (read-only snapshot)."""
        return self._slot_exec.runners.snapshot()

    @property
    def bucket_steps(self) -> Mapping[int, int]:
        """Decode steps run so far, by bucket."""
        return types.MappingProxyType(dict(self._slot_exec.bucket_steps))


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


if TYPE_CHECKING:  # mypy holds the engine to the protocol the replica uses

    def _is_an_engine(engine: StaticBatchingEngine) -> Engine:
        return engine
