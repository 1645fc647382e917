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
from .llama_step import LlamaDecode, lean_step_unsupported
from .request import Request
from .runner import BucketRunners, DecodeRunner, ModelRunner
from .threads import StepThreads, int8_single_thread_buckets

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

    def __init__(
        self,
        runner: ModelRunner,
        kv: SlotCache,
        *,
        slots: int,
        additive_mask: bool,
        windowed: bool = False,
        lean: LlamaDecode | None = None,
    ) -> None:
        self._runner = runner
        self._kv = kv
        # The model's decode forward without its modules (llama_step.py), or None: the model's own.
        self.lean = lean
        # Eager attention adds the mask to the scores, so it needs an additive float mask;
        # SDPA takes the bool mask (True = attend) directly.
        self._additive_mask = additive_mask
        # Windowed (not for CUDA graphs, whose shapes are fixed): attention reads only the
        # positions up to the step's longest row, not all L.
        self.windowed = windowed
        self.window: int | None = None
        device = runner.device
        dtype = kv.layers[0].keys.dtype
        self._kv_index = torch.arange(kv.length, device=device).view(1, 1, 1, -1)
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
        if self.windowed:
            # Exactly the longest row's positions: a single stream then attends over the same
            # keys as a DynamicCache would hold, which bf16 needs to round the same way (a
            # window rounded up to 16 changed SmolLM2's 10th greedy token in bf16).
            self.window = min(self._kv.length, max((r.n_ctx for r in rows), default=0) + 1)

    def resized(self) -> None:
        """The cache grew (:meth:`SlotCache.grow`): the mask's position index follows it."""
        self._kv_index = torch.arange(self._kv.length, device=self._kv_index.device).view(1, 1, 1, -1)

    def __call__(self, bucket: int, window: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits [b, V], argmax [b])`` of one decode forward of rows ``0..bucket-1``;
        ``window``: the attention window (default: the one ``load`` set, when windowed)."""
        runner = self._runner
        ids = self._step_in[:bucket].view(bucket, 1)
        positions = self._step_in[bucket : 2 * bucket].view(bucket, 1)
        if window is None and self.windowed:
            window = self.window
        kv_index = self._kv_index if window is None else self._kv_index[..., :window]
        valid = kv_index <= positions.view(bucket, 1, 1, 1)  # [b, 1, 1, window or L]
        mask = torch.where(valid, self._mask_on, self._mask_off) if self._additive_mask else valid
        if self.lean is not None:
            logits = self.lean(ids, positions, mask, self._kv, window)
            return logits, logits.argmax(dim=-1)
        self._kv.begin_step(positions, window)
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
        initial_seq: int | None = None,
        compile_step: bool = False,
        lean: LlamaDecode | None = None,
        single_thread_buckets: int | None = None,
    ) -> None:
        self._runner = runner
        self.buckets = buckets
        self._capture_at_start = capture_at_start
        self.max_cache_len = _aligned(max_seq)
        # A CUDA graph holds the addresses of the K/V tensors, so with graphs the slots are
        # allocated at their full length; eagerly they start at ``initial_seq`` and double as
        # rows need (SlotCache.grow, one copy per doubling).
        cache_len = self.max_cache_len
        if initial_seq is not None and not use_graphs:
            cache_len = min(cache_len, _aligned(max(initial_seq, 1)))
        self.kv_cache = SlotCache.allocate(runner.probe_kv_shapes(), max_batch_size, cache_len)
        self._slots = SlotKV(self.kv_cache)
        self.step = SlotStep(
            runner,
            self.kv_cache,
            slots=max_batch_size,
            additive_mask=additive_mask,
            windowed=not use_graphs,
            lean=lean,
        )
        self.runners = BucketRunners(self.step, use_graphs=use_graphs, compile_step=compile_step)
        # One OpenMP thread for an 8-bit model's small decode steps on the CPU (threads.py).
        if single_thread_buckets is None:
            on_cpu = runner.device.type == "cpu"
            single_thread_buckets = int8_single_thread_buckets(runner.model) if on_cpu else 0
        self.threads = StepThreads(single_thread_buckets)
        self.bucket_steps: Counter[int] = Counter()
        # Waiting on an event releases the GIL, unlike a blocking ``.tolist()``: the asyncio
        # loops can run while the GPU computes a step.
        self._done = torch.cuda.Event() if runner.device.type == "cuda" else None

    def prepare(self) -> None:
        if not self._capture_at_start:
            return
        self.runners.build_all(self.buckets)
        if self.runners.compiled is not None:
            # Compiling happens at a runner's first run: one step of padding rows per bucket
            # (they write position 0 of free slots, which every occupant's prefill overwrites).
            for bucket in self.buckets:
                self.step.load([], bucket)
                self.runners.get(bucket).run()

    def release(self) -> None:
        # The graphs hold their memory pool; nothing replays them any more.
        self.runners.clear()

    def prefill(self, reqs: Sequence[Request]) -> PaddedPrefill:
        self.threads.use_all()
        prefill = self._runner.prefill(
            [r.prompt for r in reqs], all_logits=any(r.params.prompt_logprobs is not None for r in reqs)
        )
        self._wait_device()
        return prefill

    def join(self, first: int, reqs: Sequence[Request], prefill: PaddedPrefill) -> None:
        self._reserve(prefill.mask.shape[1])
        self._slots.join(first, reqs, prefill)

    def decode(self, rows: Sequence[Request]) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(rows)
        # This step writes position n_ctx of each row.
        self._reserve(max(r.n_ctx for r in rows) + 1)
        bucket = self.buckets[bisect.bisect_left(self.buckets, n)]
        self._runner.forward_passes += 1
        self.threads.use(bucket)
        self.step.load(rows, bucket)
        logits, greedy = self.runners.get(bucket).run()
        self._wait_device()
        self.bucket_steps[bucket] += 1
        return logits[:n], greedy[:n]

    def keep(self, rows: list[Request], keep: list[int]) -> list[Request]:
        return self._slots.keep(rows, keep)

    def _reserve(self, positions: int) -> None:
        """Grows the slots (doubling, at most to ``max_cache_len``) to hold ``positions``."""
        length = self.kv_cache.length
        if positions <= length:
            return
        target = min(self.max_cache_len, max(2 * length, _aligned(positions)))
        if self.runners.use_graphs or target < positions:  # the engine's limits never allow it
            raise RuntimeError(f"{positions} positions exceed the static KV cache of {length}")
        self.kv_cache.grow(target)
        self.step.resized()
        logger.debug("static KV slots grown from %d to %d positions", length, target)

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
    * ``initial_seq_len``: without CUDA graphs, positions per slot allocated at start (rounded
      up to 16); the slots double as rows need, up to ``max_seq_len``. Default: all of them.
    * ``compile_step``: run the decode step through ``torch.compile`` (``compiled.py``) instead
      of eagerly or as CUDA graphs; each bucket compiles at its first step, or in ``start()``
      with ``capture_at_start``.
    * ``lean_step``: decode through :class:`~workers.engines.llama_step.LlamaDecode` (the
      model's forward written out, without its modules) instead of the model's own forward.
      None (default): whenever the step runs eagerly and the model takes it
      (``lean_step_unsupported``); True: a ValueError naming why a model does not; False: never.
    * ``single_thread_buckets``: decode steps of buckets up to this run on one OpenMP thread
      (``threads.py``). None (default): 4 for a model with torch's int8 linears on the CPU, else
      0 (every step on torch's threads).

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
        initial_seq_len: int | None = None,
        compile_step: bool = False,
        lean_step: bool | None = None,
        single_thread_buckets: int | None = None,
    ) -> None:
        if max_batch_size <= 0:
            raise ValueError(f"max_batch_size must be positive, got {max_batch_size}")
        runner = ModelRunner(model)
        self.model_context_length = runner.context_length(context_length)
        if max_seq_len <= 1:
            raise ValueError(f"max_seq_len must be at least 2, got {max_seq_len}")
        if initial_seq_len is not None and initial_seq_len <= 0:
            raise ValueError(f"initial_seq_len must be positive, got {initial_seq_len}")
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
        if compile_step:
            use_graphs = False
        graphs = on_cuda if use_graphs is None else bool(use_graphs)
        lean = _lean_step(runner.model, lean_step, eager=not graphs and not compile_step)
        self._slot_exec = SlotExecutor(
            runner,
            max_batch_size=max_batch_size,
            max_seq=self.max_seq,
            additive_mask=attn == "eager",
            use_graphs=graphs,
            capture_at_start=capture_at_start,
            buckets=_normalise_buckets(buckets, max_batch_size),
            initial_seq=initial_seq_len,
            compile_step=compile_step,
            lean=lean,
            single_thread_buckets=single_thread_buckets,
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
            "static KV cache: %d slots x %d positions, %.1f MiB; buckets %s; cuda graphs %s; compiled %s; "
            "lean decode step %s",
            max_batch_size,
            self.kv_cache.layers[0].keys.shape[2],
            self.kv_cache.nbytes() / 2**20,
            self.buckets,
            "on" if self._slot_exec.runners.use_graphs else "off",
            "on" if compile_step else "off",
            "on" if lean is not None else "off",
        )

    @property
    def lean_step(self) -> bool:
        """Whether decode runs :class:`~workers.engines.llama_step.LlamaDecode`."""
        return self._slot_exec.step.lean is not None

    @property
    def single_thread_buckets(self) -> int:
        """Buckets up to which a decode step runs on one thread (0: none, or nothing to switch)."""
        threads = self._slot_exec.threads
        return threads.single_up_to if threads.active else 0

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


def _lean_step(model: Any, wanted: bool | None, *, eager: bool) -> LlamaDecode | None:
    """The lean decode step ``wanted`` asks for (see ``StaticBatchingEngine``), or None."""
    if wanted is False:
        return None
    reason = lean_step_unsupported(model)
    if reason is None and not eager:
        reason = "the decode step is captured as CUDA graphs or compiled"
    if reason is not None:
        if wanted:
            raise ValueError(f"lean_step=True, but {reason}")
        logger.debug("lean decode step off: %s", reason)
        return None
    return LlamaDecode(model)


def _aligned(length: int) -> int:
    return -(-length // SEQ_ALIGN) * SEQ_ALIGN


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
