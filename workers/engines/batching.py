"""Continuous (iteration-level) batching over one Hugging Face causal LM.

``BatchingEngine`` serves many concurrent generation requests with one loaded model. A background
thread runs *steps*; each step

1. drops requests that were cancelled since the last step,
2. admits waiting requests (up to ``max_batch_size`` running) with one left-padded prefill forward
   and merges their KV cache into the running batch,
3. runs ONE decode forward for every running request (``[B, 1]`` input, padding mask, per-row
   ``position_ids``) and samples one token per row,
4. sends each request's new text to its asyncio consumer and removes finished rows at once.

So a request joins at the next step and leaves the moment it finishes, without waiting for the
rest of the batch — the scheme of Orca (OSDI '22) and vLLM, on plain transformers modules.

KV layout: one ``DynamicCache`` holds the whole batch left-padded to a common length. Real tokens of
every row sit at the right end, so one ``[B, 1]`` query per step appends a column for all rows.
Newcomers are merged by left-padding the shorter side with zeros and concatenating on the batch
dimension; finished rows go with ``index_select`` and leading columns that are padding for every
remaining row are trimmed. The model sees real positions through ``position_ids`` and ignores the
padding through the attention mask, so each row computes what it would alone.

Why not transformers' own continuous batching (``generate_batch``)? On CPU it measured about 10x
slower than a padded static batch for small models; this loop stays close to static-batch speed
(see ``bench/_engine_probe.py``).

Threads: torch releases the GIL inside kernels, so the generation thread and the asyncio loops
overlap. Results cross over with at most one pending ``loop.call_soon_threadsafe`` per event loop
into each request's ``asyncio.Queue``; consumers that fall behind get the queued pieces merged
into one ``Delta``. Nothing here raises out of the generation thread: a failing request (or step) ends the
affected requests with the exception and the engine keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import inspect
import itertools
import logging
import math
import random
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from ._detok import IncrementalDetokenizer, StopMatcher
from .api import Delta, EngineClosedError, EngineError, EngineStats, RequestCancelledError, SamplingParams

__all__ = [
    "BatchingEngine",
    "Delta",
    "EngineClosedError",
    "EngineError",
    "EngineStats",
    "GenerationStream",
    "RequestCancelledError",
    "SamplingParams",
]

logger = logging.getLogger(__name__)

# Upper bound on padded tokens in one prefill forward; newcomers beyond it are prefilled in several
# forwards of the same step, so a burst of long prompts cannot allocate unbounded activations.
_DEFAULT_PREFILL_TOKEN_BUDGET = 16384


# One queued piece of output: (new token ids, new text, finish reason, completion tokens so far).
_Piece = tuple[list[int], str, str | None, int]


class _Request:
    __slots__ = (
        "detok",
        "done",
        "eos",
        "greedy",
        "held",
        "id",
        "last_token",
        "loop",
        "mailbox",
        "n_ctx",
        "n_out",
        "params",
        "prompt",
        "queue",
        "rng",
        "stops",
        "submitted_at",
        "whole",
    )

    def __init__(
        self,
        request_id: str,
        prompt: list[int],
        params: SamplingParams,
        mailbox: _Mailbox,
        eos: frozenset[int],
        whole: bool = False,
    ) -> None:
        self.id = request_id
        self.prompt = prompt
        self.params = params
        self.mailbox = mailbox
        self.queue: asyncio.Queue[_Piece | BaseException] = asyncio.Queue()
        self.eos = eos | frozenset(params.stop_token_ids) if params.stop_token_ids else eos
        self.greedy = params.temperature == 0
        # Python's Mersenne Twister instead of a torch.Generator: one uniform per sampled token
        # is all a row needs, and random.random() costs ~50 ns against ~3 µs for a torch call.
        self.rng: random.Random | None = None
        if not self.greedy:
            self.rng = random.Random(params.seed) if params.seed is not None else random.Random()
        self.stops = StopMatcher(params.stop) if params.stop else None
        self.detok: IncrementalDetokenizer | None = None
        self.submitted_at = time.perf_counter()
        self.n_ctx = 0  # real tokens of this row held in the KV cache
        self.n_out = 0  # tokens generated
        self.last_token = -1  # sampled, not yet fed to the model
        # Set once by whichever thread ends the request first; everything else checks it.
        self.done = False
        # Its reader wants the whole text only: after the first token (time to first token is
        # still seen), pieces are held here and go over with the last, rather than waking the
        # event loop at every step (which took the GIL and a core from the forward passes).
        self.whole = whole
        self.held: list[tuple[int, str]] = []


class _Mailbox:
    """Hands pieces of output from the generation thread to one event loop.

    At most one drain callback is pending per loop: while the loop is busy, pieces pile up here and
    go over in one callback instead of one self-pipe write per step.
    """

    __slots__ = ("__weakref__", "items", "loop", "scheduled")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        # deque.extend and popleft are atomic under the GIL: the only shared state besides the flag.
        self.items: deque[tuple[_Request, Any]] = deque()
        self.scheduled = False

    def post(self, batch: list[tuple[_Request, Any]]) -> bool:
        """Generation thread side; False when the loop is closed."""
        self.items.extend(batch)
        if self.scheduled:
            return True
        self.scheduled = True
        try:
            self.loop.call_soon_threadsafe(self.drain)
        except RuntimeError:
            self.scheduled = False
            return False
        return True

    def drain(self) -> None:
        """Loop side. The flag drops first: a piece posted after it is either popped by this
        drain or schedules the next one."""
        self.scheduled = False
        items = self.items
        while items:
            req, item = items.popleft()
            req.queue.put_nowait(item)


class GenerationStream(AsyncIterator[Delta]):
    """The async iterator ``BatchingEngine.generate`` returns (``request_id``, ``aclose()``).

    Not an async generator on purpose: an abandoned async generator is only closed when the loop's
    finaliser gets to it, while this object cancels its request as soon as it is closed, its
    awaiting task is cancelled, or it is garbage-collected.
    """

    def __init__(
        self,
        engine: BatchingEngine,
        prompt: list[int],
        params: SamplingParams,
        request_id: str,
        *,
        whole: bool = False,
    ) -> None:
        self._engine = engine
        self._prompt = prompt
        self._params = params
        self.request_id = request_id
        self._whole = whole
        self._req: _Request | None = None
        self._finished = False
        self._pending_exc: BaseException | None = None

    def __aiter__(self) -> GenerationStream:
        return self

    async def __anext__(self) -> Delta:
        if self._pending_exc is not None:
            exc, self._pending_exc = self._pending_exc, None
            self._finished = True
            raise exc
        if self._finished:
            raise StopAsyncIteration
        if self._req is None:
            # Submit lazily, like an async generator: the loop is the one iterating.
            try:
                self._req = self._engine._submit(
                    self._prompt, self._params, self.request_id, whole=self._whole
                )
            except BaseException:
                self._finished = True
                raise
        queue = self._req.queue
        try:
            item = queue.get_nowait() if not queue.empty() else await queue.get()
        except asyncio.CancelledError:
            self._abandon()
            raise
        if isinstance(item, BaseException):
            self._finished = True
            raise item
        ids, text, finish, completion = item
        if finish is None and not queue.empty():
            # The consumer fell behind: hand over everything queued as one Delta.
            ids = list(ids)
            parts = [text]
            while not queue.empty():
                nxt = queue.get_nowait()
                if isinstance(nxt, BaseException):
                    self._pending_exc = nxt
                    break
                ids.extend(nxt[0])
                parts.append(nxt[1])
                finish, completion = nxt[2], nxt[3]
                if finish is not None:
                    break
            text = "".join(parts)
        if finish is not None:
            self._finished = True
        return Delta(
            text=text,
            token_ids=ids,
            finish_reason=finish,
            prompt_tokens=len(self._prompt),
            completion_tokens=completion,
        )

    async def aclose(self) -> None:
        self._abandon()

    def _abandon(self) -> None:
        if not self._finished:
            self._finished = True
            if self._req is not None:
                self._engine._cancel_request(self._req, notify=False)

    def __del__(self) -> None:
        # Lock-free and thread-safe, so it is fine wherever the garbage collector runs it.
        if not self._finished and self._req is not None:
            self._engine._cancel_request(self._req, notify=False)


class BatchingEngine:
    """Iteration-level batching of generation requests over one causal LM (see module doc)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        max_batch_size: int = 32,
        context_length: int | None = None,
        eos_token_ids: Iterable[int] | None = None,
        prefill_token_budget: int = _DEFAULT_PREFILL_TOKEN_BUDGET,
    ) -> None:
        if max_batch_size <= 0:
            raise ValueError(f"max_batch_size must be positive, got {max_batch_size}")
        self._model = model
        self._tokenizer = tokenizer
        self._max_batch = max_batch_size
        self._prefill_budget = max(1, prefill_token_budget)
        config = model.config
        if context_length is None:
            context_length = getattr(config, "max_position_embeddings", None)
        if not context_length or context_length <= 0:
            raise ValueError(
                f"context_length must be positive, got {context_length!r}; pass it explicitly "
                "when the model config has no max_position_embeddings"
            )
        self.context_length: int = int(context_length)
        self.eos_token_ids: frozenset[int] = (
            frozenset(int(i) for i in eos_token_ids)
            if eos_token_ids is not None
            else _default_eos(model, tokenizer)
        )
        embeddings = model.get_input_embeddings()
        self._vocab_size = int(getattr(embeddings, "num_embeddings", config.vocab_size))
        self._device = _model_device(model)

        params = inspect.signature(model.forward).parameters
        # transformers 5.x renamed ``past_key_values`` to ``cache``; remote-code models may not have.
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._keep_kw: str | None = next(
            (k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None
        )
        # For one query per row the SDPA mask is just the padding mask; handing it over ready
        # skips transformers' mask builder, ~15% of a small model's decode step on CPU.
        self._decode_mask_4d = _plain_sdpa(config)

        # Shared with submitters (asyncio loops); guarded by ``_cond``.
        self._cond = threading.Condition()
        self._incoming: list[_Request] = []
        self._closing = False
        self._started = False
        self._thread: threading.Thread | None = None
        # Lock-free hand-over of cancellations: deque.append is atomic, and __del__ may call it
        # on any thread, including this engine's own while it holds ``_cond``.
        self._cancel_q: deque[tuple[_Request, bool]] = deque()
        self._active: dict[str, _Request] = {}
        self._id_prefix = f"gen-{uuid.uuid4().hex[:8]}"
        self._id_counter = itertools.count(1)
        self._mailboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Mailbox] = (
            weakref.WeakKeyDictionary()
        )

        # Owned by the generation thread.
        self._waiting: deque[_Request] = deque()
        self._rows: list[_Request] = []
        self._cache: Any = None
        self._mask: torch.Tensor | None = None  # [B, L] bool, True where a real token is cached
        self._ones = torch.ones((max_batch_size, 1), dtype=torch.bool, device=self._device)
        self._outbox: dict[_Mailbox, list[tuple[_Request, Any]]] = {}

        self._forward_passes = 0
        self._finished = 0
        self._cancelled = 0
        self._generated = 0
        self._ttft_last: float | None = None
        self._ttft_sum = 0.0
        self._ttft_n = 0

    # ------------------------------------------------------------------ public API

    def start(self) -> None:
        """Starts the generation thread (idempotent)."""
        with self._cond:
            if self._closing:
                raise EngineClosedError("the engine is closed and cannot be restarted")
            if self._started:
                return
            self._started = True
            self._thread = threading.Thread(target=self._run, name="natserve-batching-engine", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stops the generation thread after its current step; pending requests end with
        ``EngineClosedError``."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        elif thread is None:
            self._fail_pending(EngineClosedError("the engine was closed"))

    def generate(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        *,
        request_id: str | None = None,
        stream: bool = True,
    ) -> GenerationStream:
        """Streams the completion of ``prompt_ids`` as ``Delta``s; the last one has a
        ``finish_reason``. Iterate it inside a running asyncio loop. Stopping the iteration
        (``break``, ``aclose()``, task cancelled) cancels the request.

        ``stream=False``: the caller wants only the whole text, so an engine may hand it over in
        fewer, larger Deltas. This one hands over the first token (its time to first token) and
        then the rest with the last; a stream gets whatever its reader has not read yet merged.

        Raises ``ValueError`` right away for values the engine cannot serve.
        """
        prompt = [int(t) for t in prompt_ids]
        self._validate(prompt, params)
        if request_id is None:
            # uuid4 reads os.urandom, ~50 µs in some VMs; a counter is unique within the engine.
            request_id = f"{self._id_prefix}-{next(self._id_counter)}"
        return GenerationStream(self, prompt, params, request_id, whole=not stream)

    def cancel(self, request_id: str) -> bool:
        """Ends a waiting or running request; its iterator raises ``RequestCancelledError``.
        Returns False when no such request is pending."""
        req = self._active.get(request_id)
        if req is None or req.done:
            return False
        return self._cancel_request(req, notify=True)

    @property
    def stats(self) -> EngineStats:
        with self._cond:
            waiting = len(self._incoming)
        waiting += len(self._waiting)
        return EngineStats(
            forward_passes=self._forward_passes,
            running=len(self._rows),
            waiting=waiting,
            finished=self._finished,
            cancelled=self._cancelled,
            ttft_last_s=self._ttft_last,
            ttft_avg_s=self._ttft_sum / self._ttft_n if self._ttft_n else None,
            generated_tokens=self._generated,
        )

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` on its own, without special tokens (BOS) added."""
        return len(self._tokenizer.encode(text, add_special_tokens=False))

    # ------------------------------------------------------------------ submission side

    def _validate(self, prompt: list[int], params: SamplingParams) -> None:
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        if params.max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {params.max_tokens}")
        if math.isnan(params.temperature) or params.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {params.temperature}")
        if not 0 < params.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {params.top_p}")
        if params.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 turns it off), got {params.top_k}")
        if not prompt:
            raise ValueError("prompt_ids is empty; at least one token is needed")
        lo, hi = min(prompt), max(prompt)
        if lo < 0 or hi >= self._vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"prompt token id {bad} is outside the vocabulary (0..{self._vocab_size - 1})")
        total = len(prompt) + params.max_tokens
        if total > self.context_length:
            raise ValueError(
                f"prompt of {len(prompt)} tokens + max_tokens {params.max_tokens} = {total} "
                f"exceeds the context length {self.context_length}"
            )

    def _submit(
        self, prompt: list[int], params: SamplingParams, request_id: str, *, whole: bool = False
    ) -> _Request:
        loop = asyncio.get_running_loop()
        with self._cond:
            mailbox = self._mailboxes.get(loop)
            if mailbox is None:
                mailbox = self._mailboxes[loop] = _Mailbox(loop)
        req = _Request(request_id, prompt, params, mailbox, self.eos_token_ids, whole)
        with self._cond:
            if self._closing:
                raise EngineClosedError("the engine is closed")
            if not self._started:
                raise EngineClosedError("the engine is not started; call BatchingEngine.start()")
            if self._active.setdefault(request_id, req) is not req:
                raise ValueError(f"request_id {request_id!r} is already in use")
            self._incoming.append(req)
            self._cond.notify()
        return req

    def _cancel_request(self, req: _Request, *, notify: bool) -> bool:
        if req.done:
            return False
        # The generation thread does the bookkeeping at its next step. ``notify`` asks it to tell
        # the consumer (an outside cancel), unlike a consumer that walked away on its own.
        self._cancel_q.append((req, notify))
        return True

    # ------------------------------------------------------------------ generation thread

    def _run(self) -> None:
        logger.debug("batching engine thread started (max_batch_size=%d)", self._max_batch)
        try:
            with torch.inference_mode():
                while True:
                    with self._cond:
                        while (
                            not self._incoming and not self._rows and not self._waiting and not self._closing
                        ):
                            self._cond.wait()
                        if self._closing:
                            break
                        self._waiting.extend(self._incoming)
                        self._incoming.clear()
                    try:
                        self._step()
                    except Exception as exc:  # a bug in a step must not kill the thread
                        logger.exception("batching engine step failed; failing the running batch")
                        self._fail_rows(list(self._rows), exc)
                        self._reset_batch()
                    finally:
                        self._flush_outbox()
        except BaseException:
            logger.exception("batching engine thread crashed")
            raise
        finally:
            with self._cond:
                # Also after a crash: later submissions must fail at once, not wait forever.
                self._closing = True
            self._fail_pending(EngineClosedError("the engine was closed"))
            self._flush_outbox()
            logger.debug("batching engine thread stopped")

    def _step(self) -> None:
        self._process_cancels()
        if self._waiting and len(self._rows) < self._max_batch:
            self._admit()
            # First tokens go out before the decode forward: this is what TTFT measures.
            self._flush_outbox()
        if self._rows:
            self._decode()

    def _process_cancels(self) -> None:
        if not self._cancel_q:
            return
        tell: set[int] = set()
        drop: dict[int, _Request] = {}
        while self._cancel_q:
            req, notify = self._cancel_q.popleft()
            drop[id(req)] = req
            if notify:
                tell.add(id(req))
        ended = [r for r in drop.values() if not r.done]
        if not ended:
            return
        for req in ended:
            req.done = True
            self._release(req)
            self._cancelled += 1
            if id(req) in tell:
                self._post(req, RequestCancelledError(f"request {req.id!r} was cancelled"))
        self._waiting = deque(r for r in self._waiting if not r.done)
        if any(r.done for r in self._rows):
            self._keep_rows([i for i, r in enumerate(self._rows) if not r.done])
        logger.debug("cancelled %d request(s)", len(ended))

    # -- admission

    def _admit(self) -> None:
        free = self._max_batch - len(self._rows)
        newcomers: list[_Request] = []
        while free > 0 and self._waiting:
            req = self._waiting.popleft()
            if not req.done:
                newcomers.append(req)
                free -= 1
        if not newcomers:
            return
        # Similar lengths together waste less padding; chunks keep each forward within budget.
        newcomers.sort(key=lambda r: len(r.prompt))
        chunk: list[_Request] = []
        for req in newcomers:
            if chunk and (len(chunk) + 1) * len(req.prompt) > self._prefill_budget:
                self._prefill_and_join(chunk)
                chunk = []
            chunk.append(req)
        self._prefill_and_join(chunk)

    def _prefill_and_join(self, reqs: list[_Request]) -> None:
        try:
            cache, mask, logits = self._prefill(reqs)
        except Exception as exc:
            if len(reqs) == 1:
                logger.warning("prefill of request %r failed: %r", reqs[0].id, exc)
                self._fail_rows(reqs, exc)
                return
            # Retry one by one so that a request that breaks the model fails alone.
            logger.warning("batched prefill of %d requests failed (%r); isolating", len(reqs), exc)
            for req in reqs:
                self._prefill_and_join([req])
            return
        now = time.perf_counter()
        try:
            tokens = self._sample(logits, reqs)
        except Exception as exc:
            logger.exception("sampling after prefill failed")
            self._fail_rows(reqs, exc)
            return
        keep: list[int] = []
        for i, (req, tok) in enumerate(zip(reqs, tokens, strict=True)):
            ttft = now - req.submitted_at
            self._ttft_last = ttft
            self._ttft_sum += ttft
            self._ttft_n += 1
            req.n_ctx = len(req.prompt)
            if not self._advance(req, tok):
                keep.append(i)
        if not keep:
            return
        joining = [reqs[i] for i in keep]
        try:
            if len(keep) < len(reqs):
                idx = torch.tensor(keep, device=self._device)
                # Left padding only ever needs to cover the longest remaining prompt.
                trim = mask.shape[1] - max(r.n_ctx for r in joining)
                for layer in cache.layers:
                    layer.keys = layer.keys.index_select(0, idx)[:, :, trim:]
                    layer.values = layer.values.index_select(0, idx)[:, :, trim:]
                mask = mask.index_select(0, idx)[:, trim:]
            self._join(joining, cache, mask)
        except Exception as exc:  # e.g. out of memory while growing the batch
            logger.exception("could not add %d request(s) to the batch", len(joining))
            self._fail_rows(joining, exc)

    def _prefill(self, reqs: list[_Request]) -> tuple[Any, torch.Tensor, torch.Tensor]:
        width = max(len(r.prompt) for r in reqs)
        ids = [[0] * (width - len(r.prompt)) + r.prompt for r in reqs]
        real = [[False] * (width - len(r.prompt)) + [True] * len(r.prompt) for r in reqs]
        input_ids = torch.tensor(ids, dtype=torch.long, device=self._device)
        mask = torch.tensor(real, dtype=torch.bool, device=self._device)
        # Padding gets position 0; it is masked out, the value only has to be valid.
        position_ids = (mask.long().cumsum(-1) - 1).clamp_(min=0)
        cache: Any = DynamicCache()
        kwargs: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": mask,
            "position_ids": position_ids,
            self._cache_kw: cache,
            "use_cache": True,
        }
        if self._keep_kw is not None:
            kwargs[self._keep_kw] = 1  # only the last position's logits are needed
        self._forward_passes += 1
        out = self._model(**kwargs)
        logits = out.logits[:, -1, :]
        if any(len(r.prompt) < width for r in reqs):
            # Keys/values computed for padding are never attended to, but a NaN there would
            # still poison a row (0 * NaN); zeros are safe whatever the attention kernel does.
            pad = ~mask[:, None, :, None]
            for layer in cache.layers:
                layer.keys.masked_fill_(pad, 0)
                layer.values.masked_fill_(pad, 0)
        return cache, mask, logits

    def _join(self, reqs: list[_Request], cache: Any, mask: torch.Tensor) -> None:
        if not self._rows or self._cache is None or self._mask is None:
            self._rows, self._cache, self._mask = list(reqs), cache, mask
            return
        width = max(self._mask.shape[1], mask.shape[1])
        # Everything is built before anything is assigned, so a failure leaves the batch intact.
        merged = [
            (
                torch.cat([_left_pad(old.keys, width), _left_pad(new.keys, width)]),
                torch.cat([_left_pad(old.values, width), _left_pad(new.values, width)]),
            )
            for old, new in zip(self._cache.layers, cache.layers, strict=True)
        ]
        merged_mask = torch.cat(
            [
                F.pad(self._mask, (width - self._mask.shape[1], 0), value=False),
                F.pad(mask, (width - mask.shape[1], 0), value=False),
            ]
        )
        for layer, (keys, values) in zip(self._cache.layers, merged, strict=True):
            layer.keys, layer.values = keys, values
        self._mask = merged_mask
        self._rows.extend(reqs)

    # -- decode

    def _decode(self) -> None:
        rows = self._rows
        assert self._mask is not None
        batch = len(rows)
        step_in = torch.tensor(
            [[r.last_token for r in rows], [r.n_ctx for r in rows]],
            dtype=torch.long,
            device=self._device,
        )
        self._mask = torch.cat([self._mask, self._ones[:batch]], dim=1)
        kwargs: dict[str, Any] = {
            "input_ids": step_in[0].unsqueeze(1),
            "attention_mask": self._mask[:, None, None, :] if self._decode_mask_4d else self._mask,
            "position_ids": step_in[1].unsqueeze(1),
            self._cache_kw: self._cache,
            "use_cache": True,
        }
        self._forward_passes += 1
        try:
            out = self._model(**kwargs)
            tokens = self._sample(out.logits[:, -1, :], rows)
        except Exception as exc:
            # A half-done forward leaves the cache inconsistent across layers: the batch is lost.
            logger.exception("decode step failed for %d request(s)", batch)
            self._fail_rows(list(rows), exc)
            self._reset_batch()
            return
        finished = False
        for req, tok in zip(rows, tokens, strict=True):
            req.n_ctx += 1
            if self._advance(req, tok):
                finished = True
        if finished:
            self._keep_rows([i for i, r in enumerate(rows) if not r.done])

    def _keep_rows(self, keep: list[int]) -> None:
        if not keep:
            self._reset_batch()
            return
        if len(keep) == len(self._rows):
            return
        assert self._mask is not None
        idx = torch.tensor(keep, device=self._device)
        rows = [self._rows[i] for i in keep]
        trim = self._mask.shape[1] - max(r.n_ctx for r in rows)
        for layer in self._cache.layers:
            layer.keys = layer.keys.index_select(0, idx)[:, :, trim:]
            layer.values = layer.values.index_select(0, idx)[:, :, trim:]
        self._mask = self._mask.index_select(0, idx)[:, trim:]
        self._rows = rows

    def _reset_batch(self) -> None:
        self._rows = []
        self._cache = None
        self._mask = None

    # -- sampling and output

    def _sample(self, logits: torch.Tensor, reqs: Sequence[_Request]) -> list[int]:
        """One token per row: argmax for greedy rows; for the others temperature, top-k, top-p and
        an inverse-CDF draw with the row's own generator, so a row's draw depends only on its
        logits and its seed, never on its batch mates."""
        sampled = [i for i, r in enumerate(reqs) if not r.greedy]
        if not sampled:
            return [int(t) for t in logits.argmax(dim=-1).tolist()]
        tokens: list[int] = (
            [int(t) for t in logits.argmax(dim=-1).tolist()] if len(sampled) < len(reqs) else [0] * len(reqs)
        )
        rows = [reqs[i] for i in sampled]
        sub = logits if len(sampled) == len(reqs) else logits[sampled]
        device = logits.device
        temps = torch.tensor([r.params.temperature for r in rows], device=device)
        sub = sub.float() / temps.unsqueeze(1)
        vocab = sub.shape[-1]
        ks = [r.params.top_k if 0 < r.params.top_k < vocab else 0 for r in rows]
        if any(ks):
            kth_idx = torch.tensor([max(k, 1) - 1 for k in ks], device=device)
            top = sub.topk(max(ks), dim=-1).values
            kth = top.gather(1, kth_idx.unsqueeze(1))
            off = torch.tensor([k == 0 for k in ks], device=device).unsqueeze(1)
            kth = kth.masked_fill(off, -math.inf)
            sub = sub.masked_fill(sub < kth, -math.inf)
        probs = torch.softmax(sub, dim=-1)
        ps = [r.params.top_p for r in rows]
        order: torch.Tensor | None = None
        if any(p < 1 for p in ps):
            probs, order = probs.sort(dim=-1, descending=True)
            before = probs.cumsum(dim=-1) - probs
            # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
            probs = probs.masked_fill(before >= torch.tensor(ps, device=device).unsqueeze(1), 0)
        cdf = probs.cumsum(dim=-1)
        u = torch.tensor([r.rng.random() for r in rows if r.rng is not None], dtype=cdf.dtype, device=device)
        pick = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True)
        pick = pick.clamp_(max=vocab - 1)
        if order is not None:
            pick = order.gather(1, pick)
        for i, tok in zip(sampled, pick.squeeze(1).tolist(), strict=True):
            tokens[i] = int(tok)
        return tokens

    def _advance(self, req: _Request, tok: int) -> bool:
        """Records one generated token, queues its text; True when the request is finished."""
        try:
            req.n_out += 1
            self._generated += 1
            req.last_token = tok
            if req.detok is None:
                req.detok = IncrementalDetokenizer(self._tokenizer, req.prompt)
            finish: str | None = None
            stops = req.stops
            if tok in req.eos:
                # The eos token counts as generated but its text is not part of the completion.
                finish = "stop"
                text = req.detok.flush()
                if stops is not None:
                    text, _ = stops.feed(text, final=True)
            else:
                text = req.detok.step(tok)
                if stops is not None:
                    text, hit = stops.feed(text)
                    if hit:
                        finish = "stop"
                if finish is None and req.n_out >= req.params.max_tokens:
                    finish = "length"
                    tail = req.detok.flush()
                    if stops is not None:
                        tail, hit = stops.feed(tail, final=True)
                        if hit:
                            finish = "stop"
                    text += tail
        except Exception as exc:
            logger.exception("output processing failed for request %r", req.id)
            self._fail_rows([req], exc)
            return True
        if finish is not None:
            req.done = True
            self._finished += 1
            self._release(req)
        elif req.whole and req.n_out > 1:
            req.held.append((tok, text))
            return False
        if req.held:
            ids = [t for t, _ in req.held]
            ids.append(tok)
            text = "".join(piece for _, piece in req.held) + text
            req.held = []
            self._post(req, (ids, text, finish, req.n_out))
        else:
            self._post(req, ([tok], text, finish, req.n_out))
        return finish is not None

    def _fail_rows(self, reqs: Iterable[_Request], exc: BaseException) -> None:
        for req in reqs:
            if req.done:
                continue
            req.done = True
            self._finished += 1
            self._release(req)
            self._post(req, _copy_exc(exc))

    def _fail_pending(self, exc: BaseException) -> None:
        with self._cond:
            pending = [*self._rows, *self._waiting, *self._incoming]
            self._incoming.clear()
        self._waiting.clear()
        self._fail_rows(pending, exc)
        self._reset_batch()

    def _release(self, req: _Request) -> None:
        if self._active.get(req.id) is req:
            del self._active[req.id]

    def _post(self, req: _Request, item: Any) -> None:
        box = self._outbox.get(req.mailbox)
        if box is None:
            self._outbox[req.mailbox] = [(req, item)]
        else:
            box.append((req, item))

    def _flush_outbox(self) -> None:
        if not self._outbox:
            return
        outbox, self._outbox = self._outbox, {}
        for mailbox, items in outbox.items():
            if not mailbox.post(items):
                # The consumer's loop is closed: nobody will read these, so stop generating.
                for req, _ in items:
                    self._cancel_request(req, notify=False)


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - t.shape[-2]
    return F.pad(t, (0, 0, missing, 0)) if missing else t


def _copy_exc(exc: BaseException) -> BaseException:
    # Each consumer raises its own instance: one object raised in many tasks would have its
    # traceback rewritten by all of them.
    try:
        dup = copy.copy(exc)
    except Exception:
        return exc
    dup.__cause__ = exc.__cause__
    return dup


def _default_eos(model: Any, tokenizer: Any) -> frozenset[int]:
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


def _model_device(model: Any) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    with contextlib.suppress(StopIteration):
        return next(model.parameters()).device
    return torch.device("cpu")
