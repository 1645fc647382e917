"""One generation request as the engine core sees it, from submission to its last token.

The scheduler queues it, the KV layout gives it a row, the sampler reads its parameters and its
random generator, and the output processor appends its tokens and text. Everything but ``done``
is touched by the generation thread only once the request is submitted; ``done`` is set once, by
whichever side ends the request first.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import TYPE_CHECKING, Any

from .api import SamplingParams, TokenLogprob
from .bridge import Mailbox
from .detokenizer import IncrementalDetokenizer, StopMatcher

if TYPE_CHECKING:
    from .grammar import GrammarState

__all__ = ["Request", "choice_seed"]

_MASK64 = (1 << 64) - 1


def choice_seed(seed: int, index: int) -> int:
    """The seed of choice ``index`` of a request seeded with ``seed``: the seed itself for choice
    0 (so ``n=1`` and the first of ``n`` agree), a splitmix64 mix of both for the others, so that
    every choice draws its own numbers and a seeded request is reproducible whatever else runs."""
    if index == 0:
        return seed
    z = (seed * 0x9E3779B97F4A7C15 + index) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


class Request:
    __slots__ = (
        "detok",
        "done",
        "eos",
        "grammar",
        "greedy",
        "group",
        "held",
        "id",
        "index",
        "keep_ids",
        "last_token",
        "mailbox",
        "n_ctx",
        "n_out",
        "out_ids",
        "params",
        "prompt",
        "prompt_lps",
        "queue",
        "rng",
        "shaped",
        "stops",
        "submitted_at",
        "whole",
    )

    def __init__(
        self,
        request_id: str,
        prompt: list[int],
        params: SamplingParams,
        mailbox: Mailbox,
        eos: frozenset[int],
        whole: bool = False,
        *,
        index: int = 0,
        queue: asyncio.Queue[Any] | None = None,
        grammar: GrammarState | None = None,
    ) -> None:
        self.id = request_id
        self.prompt = prompt
        self.params = params
        self.mailbox = mailbox
        # The choices of one request share its reader's queue; ``group`` is all of them, in
        # index order (the first is the one the scheduler queues and prefills).
        self.queue: asyncio.Queue[Any] = queue if queue is not None else asyncio.Queue()
        self.index = index
        self.group: list[Request] = [self]
        self.eos = eos | frozenset(params.stop_token_ids) if params.stop_token_ids else eos
        self.greedy = params.temperature == 0
        # Python's Mersenne Twister instead of a torch.Generator: one uniform per sampled token
        # is all a row needs, and random.random() costs ~50 ns against ~3 µs for a torch call.
        self.rng: random.Random | None = None
        if not self.greedy:
            seed = params.seed
            self.rng = random.Random(choice_seed(seed, index)) if seed is not None else random.Random()
        self.grammar = grammar
        # The sampler changes this row's logits (biases, penalties, a grammar mask).
        self.shaped = bool(
            params.logit_bias
            or params.repetition_penalty != 1.0
            or params.presence_penalty
            or params.frequency_penalty
            or grammar is not None
        )
        # Generated ids, kept only for the penalties that read them.
        self.keep_ids = bool(
            params.repetition_penalty != 1.0 or params.presence_penalty or params.frequency_penalty
        )
        self.out_ids: list[int] = []
        self.prompt_lps: list[TokenLogprob | None] | None = None
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
        self.held: list[tuple[int, str, TokenLogprob | None]] = []

    def add_choice(self, grammar: GrammarState | None = None) -> Request:
        """Adds the next of this request's ``n`` choices: same prompt, parameters and reader
        (its queue), its own index, seed and grammar state."""
        choice = Request(
            self.id,
            self.prompt,
            self.params,
            self.mailbox,
            self.eos,
            self.whole,
            index=len(self.group),
            queue=self.queue,
            grammar=grammar,
        )
        self.group.append(choice)
        choice.group = self.group
        return choice

    def finished_group(self) -> bool:
        """Every choice of this request has ended."""
        return all(r.done for r in self.group)
