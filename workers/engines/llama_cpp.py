"""The llama.cpp engine: GGUF models, continuous batching over llama.cpp's parallel sequences.

One ``llama_context`` holds ``max_batch_size`` sequences (``n_seq_max``), each with its own KV
cells for a whole context (``kv_unified`` off: attention of a sequence reads its own cells only,
which llama.cpp measured faster for sequences that share no prefix). A thread runs *steps*, each
ONE ``llama_decode`` of one ``llama_batch``:

1. the :class:`~workers.engines.scheduler.Scheduler` hands over the requests cancelled since the
   last step (their sequences are removed from the KV cache at once, ``llama_memory_seq_rm``)
   and the waiting ones, which take a free sequence id while there is one;
2. the batch gets the last sampled token of every sequence that is generating (its position is
   the sequence's length), then prompt tokens of the sequences still prefilling, up to
   ``n_batch`` tokens in all (chunked prefill: a long prompt takes several steps, the others keep
   generating meanwhile);
3. after the decode, every sequence whose logits came out samples its next token with its own
   llama.cpp sampler chain, and :class:`~workers.engines.output.OutputProcessor` (the same as the
   transformers engines') detokenizes it, matches stops and hands the piece to the request's
   event loop through the :mod:`~workers.engines.bridge`; a finished sequence leaves the KV
   cache in the same step.

So a request joins at the next step and leaves when it ends, as in the engine core of the
transformers engines; what differs is that prefill and decode share one forward.

Sampling is llama.cpp's: a chain per request of logit bias, a grammar (``constraint``), the
penalties, then greedy, or top-k, temperature, top-p, min-p and a seeded draw (``dist``), in
that order (temperature before top-p and min-p, as Hugging Face and OpenAI apply them). Values
the engine cannot serve are refused by :meth:`LlamaCppEngine.generate` with a ``ValueError``
naming the field (a 400 from the replica). llama.cpp releases the GIL inside ``llama_decode``
(ctypes does for every call), so the event loops keep running during a step.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import threading
import time
import uuid
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .api import (
    Engine,
    EngineClosedError,
    EngineError,
    EngineStats,
    RequestCancelledError,
    SamplingParams,
    check_length,
    check_sampling,
)
from .bridge import GenerationStream, Mailbox, Outbox
from .llama_vocab import GGUFTokenizer
from .output import OutputProcessor
from .request import Request
from .scheduler import Scheduler

__all__ = ["DEFAULT_N_BATCH", "LlamaCppEngine", "default_threads"]

logger = logging.getLogger(__name__)

# Tokens in one llama_decode (decode rows and prefill chunks together); llama.cpp's default
# logical and physical batch.
DEFAULT_N_BATCH = 512
# llama.cpp gives every sequence's KV cells in multiples of 256.
_KV_PAD = 256
# llama.cpp's "pick a random seed" value; a request's seed is taken modulo 2**32 and never it.
_RANDOM_SEED = 0xFFFFFFFF


def default_threads() -> int:
    """One llama.cpp thread per CPU this process may run on (llama-cpp-python's ``Llama`` takes
    half the CPUs, which leaves one of this machine's two idle); the benchmark uses the same."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not on Linux
        return max(1, os.cpu_count() or 1)


# SamplingParams fields this engine takes beyond the base ones (getattr: older SamplingParams
# lack them), and their "off" values. Everything in _REFUSED is checked by name and refused.
_REFUSED = {
    "n": 1,
    "logprobs": None,
    "prompt_logprobs": None,
}


@dataclass(slots=True)
class _Seq:
    """A request that holds a llama.cpp sequence: its id, sampler chain and prompt progress."""

    req: Request
    seq_id: int
    sampler: Any  # llama_sampler_p (the chain)
    fed: int = 0  # prompt tokens in the KV cache so far
    started: bool = False  # its first token was sampled


def _json_grammar(kind: str, value: Any) -> str:
    """GBNF for a constraint; ValueError naming it when llama.cpp cannot express it."""
    from llama_cpp import llama_grammar

    if kind == "json_object":
        return str(llama_grammar.JSON_GBNF)
    if kind == "json_schema":
        try:
            schema = value if isinstance(value, str) else json.dumps(value)
            return str(llama_grammar.json_schema_to_gbnf(schema))
        except Exception as exc:
            raise ValueError(
                f"constraint json_schema cannot be compiled to a llama.cpp grammar: {exc}"
            ) from None
    if kind == "choice":
        choices = list(value or ())
        if not choices or not all(isinstance(c, str) and c for c in choices):
            raise ValueError(f"constraint choice needs non-empty strings, got {value!r}")
        return "root ::= " + " | ".join(json.dumps(c) for c in choices)
    raise ValueError(
        f"constraint {kind!r} is not supported by the llama.cpp engine (it supports json_object, "
        "json_schema and choice)"
    )


class LlamaCppEngine:
    """An :class:`~workers.engines.api.Engine` over one GGUF model (see the module doc).

    ``model`` is a loaded ``llama_model`` (:class:`workers.loading.gguf.LoadedGGUF` has it).
    ``context_length`` bounds each request (prompt + max_tokens) and sizes each sequence's KV
    cells; ``max_batch_size`` is the number of sequences. ``start()`` creates the context.
    """

    def __init__(
        self,
        llama_cpp: Any,
        model: Any,
        tokenizer: GGUFTokenizer,
        *,
        max_batch_size: int,
        context_length: int,
        n_threads: int | None = None,
        n_batch: int = DEFAULT_N_BATCH,
        flash_attn: bool = False,
        eos_token_ids: Iterable[int] | None = None,
    ) -> None:
        if context_length <= 0:
            raise ValueError(f"context_length must be positive, got {context_length}")
        self._lib = llama_cpp
        self._model = model
        self._tokenizer = tokenizer
        self.context_length: int = context_length
        self._limit_text = f"the context length {context_length}"
        self._n_threads = n_threads or default_threads()
        self._n_batch = max(n_batch, max_batch_size)
        self._flash_attn = flash_attn
        self._per_seq = -(-context_length // _KV_PAD) * _KV_PAD
        self.n_vocab = tokenizer.n_vocab
        # Every end-of-generation token of the vocabulary unless told otherwise (() turns it off).
        self.eos_token_ids: frozenset[int] = (
            frozenset(int(i) for i in eos_token_ids)
            if eos_token_ids is not None
            else tokenizer.end_of_generation_ids()
        )
        self._scheduler = Scheduler(max_batch_size, self._n_batch, engine_name=type(self).__name__)
        self._outbox = Outbox()
        self._output = OutputProcessor(tokenizer, self._outbox, self._scheduler.release)
        self.forward_passes = 0

        self._ctx: Any = None
        self._mem: Any = None
        self._batch: Any = None
        self._seqs: list[_Seq] = []
        self._free_ids: list[int] = list(range(max_batch_size - 1, -1, -1))

        self._lifecycle = threading.Lock()
        self._thread: threading.Thread | None = None
        self._id_prefix = f"gguf-{uuid.uuid4().hex[:8]}"
        self._id_counter = itertools.count(1)
        self._mailbox_lock = threading.Lock()
        self._mailboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Mailbox] = (
            weakref.WeakKeyDictionary()
        )

    # ------------------------------------------------------------------ public API

    @property
    def tokenizer(self) -> GGUFTokenizer:
        return self._tokenizer

    @property
    def max_batch_size(self) -> int:
        return self._scheduler.max_batch_size

    @property
    def kv_bytes(self) -> int:
        """The bytes of the KV cache ``start()`` allocates: f16 K and V of every layer for each
        sequence's cells."""
        lib, model = self._lib, self._model
        head_dim = lib.llama_model_n_embd(model) // max(1, lib.llama_model_n_head(model))
        per_token = 2 * lib.llama_model_n_layer(model) * lib.llama_model_n_head_kv(model) * head_dim * 2
        return int(per_token * self._per_seq * self.max_batch_size)

    @property
    def free_sequences(self) -> int:
        """Sequence ids not held by a request (all of them once the engine is idle)."""
        return len(self._free_ids)

    def kv_positions(self) -> list[int]:
        """Per sequence id, the positions its KV cells hold (0 for a free one). For tests and
        diagnostics: read it while no step runs."""
        if self._mem is None:
            return []
        pos_max = self._lib.llama_memory_seq_pos_max
        return [int(pos_max(self._mem, s)) + 1 for s in range(self.max_batch_size)]

    def start(self) -> None:
        """Creates the llama.cpp context (its KV cache is allocated here, so an out-of-memory
        shows now) and starts the generation thread (idempotent)."""
        if self._scheduler.fresh and self._ctx is None:
            self._create_context()
        with self._lifecycle:
            if not self._scheduler.open():
                return
            self._thread = threading.Thread(target=self._run, name="natserve-llama-cpp-engine", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stops the generation thread after its current step; pending requests end with
        ``EngineClosedError``; the context and its KV cache are freed."""
        with self._lifecycle:
            self._scheduler.close()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        elif thread is None:
            self._shutdown(EngineClosedError("the engine was closed"))
        if thread is None or not thread.is_alive():
            self._free_context()

    def generate(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        *,
        request_id: str | None = None,
        stream: bool = True,
    ) -> GenerationStream:
        """Streams the completion of ``prompt_ids`` as ``Delta``s (see ``Engine``); raises
        ``ValueError`` right away for values the engine cannot serve."""
        prompt = [int(t) for t in prompt_ids]
        self._validate(prompt, params)
        if request_id is None:
            request_id = f"{self._id_prefix}-{next(self._id_counter)}"
        return GenerationStream(self, prompt, params, request_id, whole=not stream)

    def cancel(self, request_id: str) -> bool:
        req = self._scheduler.find(request_id)
        if req is None or req.done:
            return False
        return self._scheduler.cancel(req, notify=True)

    @property
    def stats(self) -> EngineStats:
        running, waiting = self._scheduler.counts()
        output = self._output
        return EngineStats(
            forward_passes=self.forward_passes,
            running=running,
            waiting=waiting,
            finished=output.finished,
            cancelled=self._scheduler.cancelled,
            ttft_last_s=output.ttft_last,
            ttft_avg_s=output.ttft_sum / output.ttft_n if output.ttft_n else None,
            generated_tokens=output.generated,
        )

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def count_tokens(self, text: str) -> int:
        return len(self._tokenizer.encode(text, add_special_tokens=False))

    # ------------------------------------------------------------------ submission side

    def _validate(self, prompt: list[int], params: SamplingParams) -> None:
        check_sampling(params)
        for name, off in _REFUSED.items():
            value = getattr(params, name, off)
            if value != off:
                raise ValueError(f"{name}={value!r} is not supported by the llama.cpp engine")
        if not prompt:
            raise ValueError("prompt_ids is empty; at least one token is needed")
        lo, hi = min(prompt), max(prompt)
        if lo < 0 or hi >= self.n_vocab:
            bad = lo if lo < 0 else hi
            raise ValueError(f"prompt token id {bad} is outside the vocabulary (0..{self.n_vocab - 1})")
        for tok, _ in self._logit_bias(params):
            if not 0 <= tok < self.n_vocab:
                raise ValueError(
                    f"logit_bias token id {tok} is outside the vocabulary (0..{self.n_vocab - 1})"
                )
        repetition = getattr(params, "repetition_penalty", 1.0)
        if not repetition > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {repetition}")
        constraint = getattr(params, "constraint", None)
        if constraint is not None:
            _json_grammar(getattr(constraint, "kind", repr(constraint)), getattr(constraint, "value", None))
        check_length(len(prompt), params.max_tokens, self.context_length, self._limit_text)

    @staticmethod
    def _logit_bias(params: SamplingParams) -> list[tuple[int, float]]:
        bias = getattr(params, "logit_bias", None) or ()
        items = bias.items() if isinstance(bias, dict) else bias
        return [(int(t), float(b)) for t, b in items]

    def _submit(self, prompt: list[int], params: SamplingParams, request_id: str, *, whole: bool) -> Request:
        loop = asyncio.get_running_loop()
        with self._mailbox_lock:
            mailbox = self._mailboxes.get(loop)
            if mailbox is None:
                mailbox = self._mailboxes[loop] = Mailbox(loop)
        req = Request(request_id, prompt, params, mailbox, self.eos_token_ids, whole)
        self._scheduler.submit(req)
        return req

    def _cancel_request(self, req: Request, *, notify: bool) -> bool:
        return self._scheduler.cancel(req, notify=notify)

    # ------------------------------------------------------------------ llama.cpp objects

    def _create_context(self) -> None:
        lib = self._lib
        n_seq = self.max_batch_size
        per_seq = self._per_seq
        cp = lib.llama_context_default_params()
        cp.n_ctx = per_seq * n_seq
        cp.n_batch = self._n_batch
        cp.n_ubatch = self._n_batch
        cp.n_seq_max = n_seq
        cp.n_threads = self._n_threads
        cp.n_threads_batch = self._n_threads
        cp.kv_unified = False
        cp.no_perf = True
        cp.flash_attn_type = (
            lib.LLAMA_FLASH_ATTN_TYPE_ENABLED if self._flash_attn else lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        ctx = lib.llama_init_from_model(self._model, cp)
        if not ctx:
            raise EngineError(
                f"llama.cpp could not create a context of {n_seq} sequences x {per_seq} tokens "
                "(out of memory? lower max_batch_size or the context_length)"
            )
        self._ctx = ctx
        self._mem = lib.llama_get_memory(ctx)
        self._batch = lib.llama_batch_init(self._n_batch, 0, 1)

    def _free_context(self) -> None:
        lib = self._lib
        for seq in self._seqs:
            lib.llama_sampler_free(seq.sampler)
        self._seqs = []
        if self._batch is not None:
            lib.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx is not None:
            lib.llama_free(self._ctx)
            self._ctx = self._mem = None

    def _sampler_for(self, req: Request) -> Any:
        """The request's sampler chain; its order is the module doc's."""
        lib = self._lib
        params = req.params
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        add = lib.llama_sampler_chain_add
        bias = self._logit_bias(params)
        if bias:
            arr = (lib.llama_logit_bias * len(bias))(*[lib.llama_logit_bias(t, b) for t, b in bias])
            add(chain, lib.llama_sampler_init_logit_bias(self.n_vocab, len(bias), arr))
        constraint = getattr(params, "constraint", None)
        if constraint is not None:
            grammar = _json_grammar(constraint.kind, constraint.value)
            smpl = lib.llama_sampler_init_grammar(self._tokenizer._vocab, grammar.encode(), b"root")
            if not smpl:
                lib.llama_sampler_free(chain)
                raise ValueError(f"llama.cpp could not parse the grammar of constraint {constraint.kind!r}")
            add(chain, smpl)
        repetition = float(getattr(params, "repetition_penalty", 1.0))
        if repetition != 1.0:
            # Hugging Face's repetition penalty counts the prompt's tokens too.
            rep = lib.llama_sampler_init_penalties(self.n_vocab, self.context_length, repetition, 0.0, 0.0)
            for tok in req.prompt:
                lib.llama_sampler_accept(rep, tok)
            add(chain, rep)
        freq = float(getattr(params, "frequency_penalty", 0.0))
        presence = float(getattr(params, "presence_penalty", 0.0))
        if freq or presence:
            # OpenAI's: over the generated tokens only.
            add(
                chain,
                lib.llama_sampler_init_penalties(self.n_vocab, self.context_length, 1.0, freq, presence),
            )
        if req.greedy:
            add(chain, lib.llama_sampler_init_greedy())
            return chain
        if 0 < params.top_k < self.n_vocab:
            add(chain, lib.llama_sampler_init_top_k(params.top_k))
        add(chain, lib.llama_sampler_init_temp(params.temperature))
        if params.top_p < 1:
            add(chain, lib.llama_sampler_init_top_p(params.top_p, 1))
        min_p = float(getattr(params, "min_p", 0.0) or 0.0)
        if min_p > 0:
            add(chain, lib.llama_sampler_init_min_p(min_p, 1))
        if params.seed is not None:
            seed = params.seed % (1 << 32)
            if seed == _RANDOM_SEED:
                seed -= 1
        else:
            seed = int.from_bytes(os.urandom(4), "little") % _RANDOM_SEED
        add(chain, lib.llama_sampler_init_dist(seed))
        return chain

    # ------------------------------------------------------------------ generation thread

    def _run(self) -> None:
        scheduler = self._scheduler
        try:
            while scheduler.wait_for_work():
                try:
                    self._step()
                except Exception as exc:  # a bug in a step must not kill the thread
                    logger.exception("llama.cpp engine step failed; failing the running batch")
                    self._fail_all(exc)
                finally:
                    self._flush()
        except BaseException:
            logger.exception("llama.cpp engine thread crashed")
            raise
        finally:
            self._shutdown(EngineClosedError("the engine was closed"))

    def _sync_running(self) -> None:
        self._scheduler.running = [s.req for s in self._seqs]

    def _release(self, seq: _Seq) -> None:
        self._lib.llama_memory_seq_rm(self._mem, seq.seq_id, -1, -1)
        self._lib.llama_sampler_free(seq.sampler)
        self._free_ids.append(seq.seq_id)

    def _drop_done(self) -> None:
        if any(s.req.done for s in self._seqs):
            keep: list[_Seq] = []
            for seq in self._seqs:
                if seq.req.done:
                    self._release(seq)
                else:
                    keep.append(seq)
            self._seqs = keep
            self._sync_running()

    def _fail_all(self, exc: BaseException) -> None:
        self._output.fail([s.req for s in self._seqs], exc)
        self._drop_done()

    def _step(self) -> None:
        scheduler = self._scheduler
        for req, tell in scheduler.take_cancels():
            if tell:
                self._outbox.post(req, RequestCancelledError(f"request {req.id!r} was cancelled"))
        self._drop_done()
        self._admit()
        if self._seqs:
            self._decode()

    def _admit(self) -> None:
        waiting = self._scheduler.waiting
        admitted = False
        while waiting and self._free_ids:
            req = waiting.popleft()
            if req.done:
                continue
            try:
                sampler = self._sampler_for(req)
            except Exception as exc:
                self._output.fail([req], exc)
                continue
            self._seqs.append(_Seq(req, self._free_ids.pop(), sampler))
            admitted = True
        if admitted:
            self._sync_running()

    def _decode(self) -> None:
        lib = self._lib
        batch = self._batch
        token, pos, n_seq_id, seq_ids, logits = (
            batch.token,
            batch.pos,
            batch.n_seq_id,
            batch.seq_id,
            batch.logits,
        )
        budget = self._n_batch
        n = 0
        # (batch index of its logits, seq) of every sequence that samples after this decode.
        outputs: list[tuple[int, _Seq]] = []
        for seq in self._seqs:
            if seq.started:
                req = seq.req
                token[n] = req.last_token
                pos[n] = req.n_ctx
                n_seq_id[n] = 1
                seq_ids[n][0] = seq.seq_id
                logits[n] = 1
                outputs.append((n, seq))
                n += 1
        for seq in self._seqs:
            if seq.started or n >= budget:
                continue
            prompt = seq.req.prompt
            take = min(len(prompt) - seq.fed, budget - n)
            sid = seq.seq_id
            for p in range(seq.fed, seq.fed + take):
                token[n] = prompt[p]
                pos[n] = p
                n_seq_id[n] = 1
                seq_ids[n][0] = sid
                logits[n] = 0
                n += 1
            seq.fed += take
            if seq.fed == len(prompt):
                logits[n - 1] = 1
                outputs.append((n - 1, seq))
        batch.n_tokens = n
        rc = lib.llama_decode(self._ctx, batch)
        self.forward_passes += 1
        if rc != 0:
            # Sequences may hold part of this batch now: every running one is lost.
            lib.llama_memory_clear(self._mem, True)
            self._fail_all(
                EngineError(f"llama_decode failed (status {rc}) for {len(self._seqs)} sequence(s)")
            )
            return
        now = time.perf_counter()
        output = self._output
        advance = output.advance
        sample = lib.llama_sampler_sample
        ctx = self._ctx
        finished = False
        for idx, seq in outputs:
            req = seq.req
            if req.done:  # cancelled by its reader's loop closing while the step ran
                finished = True
                continue
            tok = int(sample(seq.sampler, ctx, idx))
            if seq.started:
                req.n_ctx += 1
            else:
                seq.started = True
                req.n_ctx = len(req.prompt)
                output.first_tokens((req,), now)
            if advance(req, tok):
                finished = True
        if finished:
            self._drop_done()

    def _flush(self) -> None:
        for req in self._outbox.flush():
            self._scheduler.cancel(req, notify=False)

    def _shutdown(self, exc: BaseException) -> None:
        self._output.fail(self._scheduler.drain(), exc)
        self._drop_done()
        self._flush()


if TYPE_CHECKING:  # mypy holds the engine to the protocol the replica uses

    def _is_an_engine(engine: LlamaCppEngine) -> Engine:
        return engine
