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
from typing import Any

from .api import SamplingParams
from .bridge import Mailbox
from .detokenizer import IncrementalDetokenizer, StopMatcher

__all__ = ["Request"]


class Request:
    __slots__ = (
        "detok",
        "done",
        "eos",
        "greedy",
        "held",
        "id",
        "last_token",
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
        mailbox: Mailbox,
        eos: frozenset[int],
        whole: bool = False,
    ) -> None:
        self.id = request_id
        self.prompt = prompt
        self.params = params
        self.mailbox = mailbox
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
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
