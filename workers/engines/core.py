"""The engine core: continuous (iteration-level) batching over one Hugging Face causal LM.

``EngineCore`` serves many concurrent generation requests with one loaded model. A background
thread runs *steps*, each a short loop of schedule -> execute -> update over its parts:

1. the :class:`~workers.engines.scheduler.Scheduler` ends requests cancelled since the last step
   and admits waiting ones (up to ``max_batch_size`` running) in chunks within the prefill budget;
2. the :class:`Executor` prefills each chunk (one left-padded forward) and the
   :class:`~workers.engines.sampler.Sampler` picks every newcomer's first token; the
   :class:`~workers.engines.output.OutputProcessor` turns it into output, and the rows still
   running join the executor's KV layout;
3. the executor runs ONE decode forward for every running request, the sampler picks one token
   per row, and :meth:`EngineCore._update` hands each to the output processor; finished rows leave
   the KV layout at once;
4. the :class:`~workers.engines.bridge.Outbox` sends each event loop its pieces of the step.

So a request joins at the next step and leaves the moment it finishes, without waiting for the
rest of the batch — the scheme of Orca (OSDI '22) and vLLM, on plain transformers modules. What
differs between the engines is the executor alone: the KV layout and how its decode step runs
(``batching.py``: a left-padded dynamic cache, eager; ``static.py``: static slots, bucketed eager
or CUDA-graph steps). Neither engine overrides a step of the loop.

Nothing raises out of the generation thread: a failing request (or step) ends the affected
requests with the exception and the engine keeps serving.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
import uuid
import weakref
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import torch

from .api import (
    EngineClosedError,
    EngineStats,
    RequestCancelledError,
    SamplingParams,
    TokenLogprob,
    check_length,
    check_sampling,
)
from .bridge import GenerationStream, Mailbox, Outbox
from .grammar import GrammarCompiler
from .kv_padded import PaddedPrefill
from .output import OutputProcessor
from .request import Request
from .runner import ModelRunner, default_eos
from .sampler import Sampler, prompt_logprobs
from .scheduler import DEFAULT_PREFILL_TOKEN_BUDGET, Scheduler

__all__ = ["DEFAULT_PREFILL_TOKEN_BUDGET", "EngineCore", "Executor"]

logger = logging.getLogger(__name__)


class Executor(Protocol):
    """A KV layout and the runner of its decode step: the part that differs between engines.

    Called on the generation thread only, except ``prepare`` (before it starts) and ``release``
    (after it stopped). Row ``i`` of the layout is ``rows[i]`` as the core passes them.
    """

    def prepare(self) -> None:
        """Work to do before serving (e.g. capturing CUDA graphs), so that errors show at start."""

    def release(self) -> None:
        """Frees what only the stopped generation thread used."""

    def prefill(self, reqs: Sequence[Request]) -> PaddedPrefill:
        """One forward over the prompts of ``reqs``, left-padded together."""

    def join(self, first: int, reqs: Sequence[Request], prefill: PaddedPrefill) -> None:
        """Adds the prefilled ``reqs`` as rows ``first..`` (``prefill`` holds exactly them)."""

    def decode(self, rows: Sequence[Request]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One decode forward of every row: logits ``[n, V]``, and the argmax when the step
        computed it anyway."""

    def keep(self, rows: list[Request], keep: list[int]) -> list[Request]:
        """Drops every row but ``keep`` (increasing, not empty); the rows in their new order."""

    def reset(self) -> None:
        """Forgets every row (the batch is lost)."""


class EngineCore:
    """Iteration-level batching of generation requests over one causal LM (see the module doc).

    Satisfies :class:`~workers.engines.api.Engine`; the batching and static engines are this
    class with their executors.
    """

    def __init__(
        self,
        runner: ModelRunner,
        executor: Executor,
        tokenizer: Any,
        *,
        max_batch_size: int,
        context_length: int,
        limit_text: str,
        eos_token_ids: Iterable[int] | None = None,
        prefill_token_budget: int = DEFAULT_PREFILL_TOKEN_BUDGET,
    ) -> None:
        self._runner = runner
        self._executor = executor
        self._tokenizer = tokenizer
        self.context_length: int = context_length
        # What a request too long for ``context_length`` is told it exceeds.
        self._limit_text = limit_text
        self.eos_token_ids: frozenset[int] = (
            frozenset(int(i) for i in eos_token_ids)
            if eos_token_ids is not None
            else default_eos(runner.model, tokenizer)
        )
        self._scheduler = Scheduler(max_batch_size, prefill_token_budget, engine_name=type(self).__name__)
        self._outbox = Outbox()
        self._output = OutputProcessor(tokenizer, self._outbox, self._scheduler.release)
        self._sampler = Sampler()
        self._grammars = GrammarCompiler(tokenizer, runner.vocab_size, self.eos_token_ids)

        self._lifecycle = threading.Lock()
        self._thread: threading.Thread | None = None
        self._id_prefix = f"gen-{uuid.uuid4().hex[:8]}"
        self._id_counter = itertools.count(1)
        self._mailbox_lock = threading.Lock()
        self._mailboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Mailbox] = (
            weakref.WeakKeyDictionary()
        )

    # ------------------------------------------------------------------ public API

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def max_batch_size(self) -> int:
        return self._scheduler.max_batch_size

    def start(self) -> None:
        """Starts the generation thread (idempotent); first does the executor's preparation
        (e.g. capturing CUDA graphs), so that its errors surface here."""
        if self._scheduler.fresh:
            with self._runner.on_device(), torch.inference_mode():
                self._executor.prepare()
        with self._lifecycle:
            if not self._scheduler.open():
                return
            self._thread = threading.Thread(target=self._run, name="natserve-batching-engine", daemon=True)
            self._thread.start()
        self._grammars.warm()

    def close(self) -> None:
        """Stops the generation thread after its current step; pending requests end with
        ``EngineClosedError``."""
        with self._lifecycle:
            self._scheduler.close()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        elif thread is None:
            self._shutdown(EngineClosedError("the engine was closed"))
        if thread is None or not thread.is_alive():
            self._executor.release()

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
        if params.constraint is not None:
            # Compiled here, on the caller's thread: a grammar that does not compile is the
            # caller's InvalidRequestError before anything is queued.
            self._grammars.compile(params.constraint)
        if request_id is None:
            # uuid4 reads os.urandom, ~50 µs in some VMs; a counter is unique within the engine.
            request_id = f"{self._id_prefix}-{next(self._id_counter)}"
        return GenerationStream(self, prompt, params, request_id, whole=not stream)

    def cancel(self, request_id: str) -> bool:
        """Ends a waiting or running request; its iterator raises ``RequestCancelledError``.
        Returns False when no such request is pending."""
        req = self._scheduler.find(request_id)
        if req is None or req.finished_group():
            return False
        return self._scheduler.cancel(req, notify=True)

    @property
    def stats(self) -> EngineStats:
        running, waiting = self._scheduler.counts()
        output = self._output
        return EngineStats(
            forward_passes=self._runner.forward_passes,
            running=running,
            waiting=waiting,
            finished=output.finished,
            cancelled=self._scheduler.cancelled,
            ttft_last_s=output.ttft_last,
            ttft_avg_s=output.ttft_sum / output.ttft_n if output.ttft_n else None,
            generated_tokens=output.generated,
        )

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """The prompt tokens of ``text``, as ``generate`` takes them."""
        return list(self._tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` on its own, without special tokens (BOS) added."""
        return len(self._tokenizer.encode(text, add_special_tokens=False))

    # ------------------------------------------------------------------ submission side

    def _validate(self, prompt: list[int], params: SamplingParams) -> None:
        check_sampling(params)
        if not prompt:
            raise ValueError("prompt_ids is empty; at least one token is needed")
        lo, hi = min(prompt), max(prompt)
        vocab = self._runner.vocab_size
        if lo < 0 or hi >= vocab:
            bad = lo if lo < 0 else hi
            raise ValueError(f"prompt token id {bad} is outside the vocabulary (0..{vocab - 1})")
        check_length(len(prompt), params.max_tokens, self.context_length, self._limit_text)
        if params.n > self.max_batch_size:
            raise ValueError(
                f"n {params.n} exceeds the {self.max_batch_size} rows this engine runs at once "
                "(max_batch_size)"
            )
        for token, _ in params.logit_bias:
            if token >= vocab:
                raise ValueError(f"logit_bias token id {token} is outside the vocabulary (0..{vocab - 1})")

    def _submit(self, prompt: list[int], params: SamplingParams, request_id: str, *, whole: bool) -> Request:
        """The stream's first read: the request enters the scheduler (on the reader's loop)."""
        loop = asyncio.get_running_loop()
        with self._mailbox_lock:
            mailbox = self._mailboxes.get(loop)
            if mailbox is None:
                mailbox = self._mailboxes[loop] = Mailbox(loop)
        constraint = params.constraint
        grammar = self._grammars.compile(constraint).start() if constraint is not None else None
        req = Request(request_id, prompt, params, mailbox, self.eos_token_ids, whole, grammar=grammar)
        for _ in range(1, params.n):
            req.add_choice(self._grammars.compile(constraint).start() if constraint is not None else None)
        self._scheduler.submit(req)
        return req

    def _cancel_request(self, req: Request, *, notify: bool) -> bool:
        return self._scheduler.cancel(req, notify=notify)

    # ------------------------------------------------------------------ generation thread

    def _run(self) -> None:
        scheduler = self._scheduler
        logger.debug("batching engine thread started (max_batch_size=%d)", scheduler.max_batch_size)
        try:
            with self._runner.on_device(), torch.inference_mode():
                while scheduler.wait_for_work():
                    try:
                        self._step()
                    except Exception as exc:  # a bug in a step must not kill the thread
                        logger.exception("batching engine step failed; failing the running batch")
                        self._output.fail(list(scheduler.running), exc)
                        self._reset()
                    finally:
                        self._flush()
        except BaseException:
            logger.exception("batching engine thread crashed")
            raise
        finally:
            self._shutdown(EngineClosedError("the engine was closed"))
            logger.debug("batching engine thread stopped")

    def _step(self) -> None:
        scheduler = self._scheduler
        self._cancels()
        if scheduler.waiting and len(scheduler.running) < scheduler.max_batch_size:
            for chunk in scheduler.schedule():
                self._prefill_and_join(chunk)
            # First tokens go out before the decode forward: this is what TTFT measures.
            self._flush()
        if scheduler.running:
            self._decode()

    def _cancels(self) -> None:
        ended = self._scheduler.take_cancels()
        if not ended:
            return
        for req, tell in ended:
            if tell:
                self._outbox.post(req, RequestCancelledError(f"request {req.id!r} was cancelled"))
        running = self._scheduler.running
        if any(r.done for r in running):
            self._keep([i for i, r in enumerate(running) if not r.done])
        logger.debug("cancelled %d request(s)", len(ended))

    def _prefill_and_join(self, reqs: list[Request]) -> None:
        """Prefills ``reqs`` (one row each) and forks each to its ``n`` choices: the choices
        share the prompt's logits and its KV rows."""
        output = self._output
        rows = [c for r in reqs for c in r.group]
        try:
            prefill = self._executor.prefill(reqs)
        except Exception as exc:
            if len(reqs) == 1:
                logger.warning("prefill of request %r failed: %r", reqs[0].id, exc)
                output.fail(rows, exc)
                return
            # Retry one by one so that a request that breaks the model fails alone.
            logger.warning("batched prefill of %d requests failed (%r); isolating", len(reqs), exc)
            for req in reqs:
                self._prefill_and_join([req])
            return
        now = time.perf_counter()
        # Row ``i`` of the step is prefill row ``source[i]``.
        source = [i for i, r in enumerate(reqs) for _ in r.group]
        forked = len(rows) > len(reqs)
        try:
            if prefill.prompt_logits is not None:
                self._prompt_logprobs(reqs, prefill)
            logits = prefill.logits
            if forked:
                logits = logits.index_select(0, torch.tensor(source, device=logits.device))
            tokens, logprobs = self._sampler.sample(logits, rows)
        except Exception as exc:
            logger.exception("sampling after prefill failed")
            output.fail(rows, exc)
            return
        output.first_tokens(reqs, now)
        keep: list[int] = []
        advance = output.advance
        for i, (req, tok) in enumerate(zip(rows, tokens, strict=True)):
            req.n_ctx = len(req.prompt)
            if not advance(req, tok, logprobs[i] if logprobs is not None else None):
                keep.append(i)
        if not keep:
            return
        joining = [rows[i] for i in keep]
        running = self._scheduler.running
        try:
            if len(keep) < len(reqs) or forked:
                prefill.select([source[i] for i in keep], max(r.n_ctx for r in joining))
            self._executor.join(len(running), joining, prefill)
        except Exception as exc:  # e.g. out of memory while growing the batch
            logger.exception("could not add %d request(s) to the batch", len(joining))
            output.fail(joining, exc)
            return
        running.extend(joining)

    def _prompt_logprobs(self, reqs: list[Request], prefill: PaddedPrefill) -> None:
        """The prompt logprobs of the requests that asked, for their first piece of output."""
        assert prefill.prompt_logits is not None
        width = prefill.prompt_logits.shape[1]
        for i, req in enumerate(reqs):
            k = req.params.prompt_logprobs
            if k is None:
                continue
            logits = prefill.prompt_logits[i, width - len(req.prompt) :]
            req.prompt_lps = prompt_logprobs(logits, req.prompt, k, req.params.temperature)
        prefill.prompt_logits = None

    def _decode(self) -> None:
        rows = self._scheduler.running
        try:
            logits, argmax = self._executor.decode(rows)
            tokens, logprobs = self._sampler.sample(logits, rows, argmax)
        except Exception as exc:
            # A half-done forward leaves the KV of this step inconsistent: the batch is lost.
            logger.exception("decode step failed for %d request(s)", len(rows))
            self._output.fail(list(rows), exc)
            self._reset()
            return
        self._update(rows, tokens, logprobs)

    def _update(
        self, rows: list[Request], tokens: list[int], logprobs: list[TokenLogprob | None] | None
    ) -> None:
        """The decode step's tokens, one per row, to the output; finished rows leave."""
        finished = False
        advance = self._output.advance
        if logprobs is None:
            for req, tok in zip(rows, tokens, strict=True):
                req.n_ctx += 1
                if advance(req, tok):
                    finished = True
        else:
            for req, tok, lp in zip(rows, tokens, logprobs, strict=True):
                req.n_ctx += 1
                if advance(req, tok, lp):
                    finished = True
        if finished:
            self._keep([i for i, r in enumerate(rows) if not r.done])

    def _keep(self, keep: list[int]) -> None:
        if not keep:
            self._reset()
            return
        scheduler = self._scheduler
        if len(keep) == len(scheduler.running):
            return
        scheduler.running = self._executor.keep(scheduler.running, keep)

    def _reset(self) -> None:
        self._scheduler.running = []
        self._executor.reset()

    def _flush(self) -> None:
        for req in self._outbox.flush():
            # The reader's loop is closed: nobody will read it, so stop generating.
            self._scheduler.cancel(req, notify=False)

    def _shutdown(self, exc: BaseException) -> None:
        """Ends every pending request with ``exc``; no request is accepted any more."""
        self._output.fail(self._scheduler.drain(), exc)
        self._executor.reset()
        self._flush()
