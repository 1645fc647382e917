"""Output processing: what one sampled token does to its request.

:meth:`OutputProcessor.advance` is the one place a generated token is appended, detokenized,
matched against the stop strings and stop ids, checked against ``max_tokens`` and turned into a
piece of output (or held back for a reader of the whole text); both LLM engines call it for every
row of every step. It also ends requests that failed and keeps the counts the engine's statistics
report. Nothing here imports torch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from .api import TokenLogprob
from .bridge import Outbox, copy_exc
from .detokenizer import IncrementalDetokenizer
from .request import Request

__all__ = ["OutputProcessor"]

logger = logging.getLogger(__name__)


class OutputProcessor:
    """Turns sampled tokens into pieces of output in the :class:`Outbox` (generation thread)."""

    __slots__ = (
        "_outbox",
        "_release",
        "_tokenizer",
        "finished",
        "generated",
        "ttft_last",
        "ttft_n",
        "ttft_sum",
    )

    def __init__(self, tokenizer: Any, outbox: Outbox, release: Callable[[Request], None]) -> None:
        self._tokenizer = tokenizer
        self._outbox = outbox
        # Forgets a request that ended (the scheduler's table of pending request ids).
        self._release = release
        self.finished = 0  # ended with "stop"/"length" or with an error
        self.generated = 0
        self.ttft_last: float | None = None
        self.ttft_sum = 0.0
        self.ttft_n = 0

    def first_tokens(self, reqs: Iterable[Request], now: float) -> None:
        """Records the time to first token of ``reqs``, whose first token was sampled at ``now``."""
        for req in reqs:
            ttft = now - req.submitted_at
            self.ttft_last = ttft
            self.ttft_sum += ttft
            self.ttft_n += 1

    def advance(self, req: Request, tok: int, logprob: TokenLogprob | None = None) -> bool:
        """Records one generated token (and its logprobs, when asked), queues its text; True
        when the request is finished."""
        try:
            req.n_out += 1
            self.generated += 1
            req.last_token = tok
            if req.keep_ids:
                req.out_ids.append(tok)
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
                # A grammar that accepts and allows nothing more ends the row here, without a
                # forward pass spent on the eos it would force.
                if finish is None and req.grammar is not None and req.grammar.advance(tok):
                    finish = "stop"
                if finish is None and req.n_out >= req.params.max_tokens:
                    finish = "length"
                if finish is not None and not (stops is not None and hit):
                    tail = req.detok.flush()
                    if stops is not None:
                        tail, hit = stops.feed(tail, final=True)
                        if hit:
                            finish = "stop"
                    text += tail
        except Exception as exc:
            logger.exception("output processing failed for request %r", req.id)
            self.fail([req], exc)
            return True
        if finish is not None:
            req.done = True
            self.finished += 1
            self._release(req)
        elif req.whole and req.n_out > 1:
            req.held.append((tok, text, logprob))
            return False
        prompt_lps = req.prompt_lps
        if prompt_lps is not None:
            req.prompt_lps = None
        if req.held:
            held = req.held
            req.held = []
            ids = [t for t, _, _ in held]
            ids.append(tok)
            text = "".join(piece for _, piece, _ in held) + text
            lps: list[TokenLogprob] | None = None
            if logprob is not None:
                lps = [lp for _, _, lp in held if lp is not None]
                lps.append(logprob)
            self._outbox.post(req, (ids, text, finish, req.n_out, req.index, lps, prompt_lps))
        else:
            lps = [logprob] if logprob is not None else None
            self._outbox.post(req, ([tok], text, finish, req.n_out, req.index, lps, prompt_lps))
        return finish is not None

    def fail(self, reqs: Iterable[Request], exc: BaseException) -> None:
        """Ends ``reqs`` (those not ended yet) with ``exc``, each reader with its own copy."""
        for req in reqs:
            if req.done:
                continue
            req.done = True
            self.finished += 1
            self._release(req)
            self._outbox.post(req, copy_exc(exc))
