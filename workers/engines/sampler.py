"""The sampler: one next token per row of a step's logits, by each row's own parameters.

Greedy rows take the argmax (computed inside the decode step where the runner already did, as the
CUDA graphs do). The other rows get temperature, top-k and top-p vectorised over the sampled rows
on the device, then an inverse-CDF draw with one uniform from the request's own seeded generator,
so that a row's draw depends only on its logits and its seed, never on its batch mates.

Where the next parameters go (one place each, all vectorised over the rows that ask for them, so
that rows without them cost nothing): logit processors that change the logits of a row before the
temperature (penalties over the row's generated tokens, logit bias, grammar masks) in
:meth:`Sampler.sample` ahead of the temperature; ``min_p`` next to ``top_p``; log-probabilities
from the same (processed) logits, returned next to the tokens. ``n`` choices are ``n`` requests
that share a prompt, which is the scheduler's business, not the sampler's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .request import Request

__all__ = ["Sampler"]


class Sampler:
    """Samples one token per row (generation thread)."""

    __slots__ = ()

    def sample(
        self, logits: torch.Tensor, rows: Sequence[Request], argmax: torch.Tensor | None = None
    ) -> list[int]:
        """``logits`` ``[len(rows), V]``; ``argmax`` (``[len(rows)]``), when the step computed it
        already, saves computing it again."""
        sampled = [i for i, r in enumerate(rows) if not r.greedy]
        if len(sampled) < len(rows):
            # A long tensor's tolist() holds Python ints already.
            tokens: list[int] = (argmax if argmax is not None else logits.argmax(dim=-1)).tolist()
            if not sampled:
                return tokens
        else:
            tokens = [0] * len(rows)
        picked = [rows[i] for i in sampled]
        sub = logits if len(sampled) == len(rows) else logits[sampled]
        device = logits.device
        temps = torch.tensor([r.params.temperature for r in picked], device=device)
        sub = sub.float() / temps.unsqueeze(1)
        vocab = sub.shape[-1]
        ks = [r.params.top_k if 0 < r.params.top_k < vocab else 0 for r in picked]
        if any(ks):
            kth_idx = torch.tensor([max(k, 1) - 1 for k in ks], device=device)
            top = sub.topk(max(ks), dim=-1).values
            kth = top.gather(1, kth_idx.unsqueeze(1))
            off = torch.tensor([k == 0 for k in ks], device=device).unsqueeze(1)
            kth = kth.masked_fill(off, -math.inf)
            sub = sub.masked_fill(sub < kth, -math.inf)
        probs = torch.softmax(sub, dim=-1)
        ps = [r.params.top_p for r in picked]
        order: torch.Tensor | None = None
        if any(p < 1 for p in ps):
            probs, order = probs.sort(dim=-1, descending=True)
            before = probs.cumsum(dim=-1) - probs
            # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
            probs = probs.masked_fill(before >= torch.tensor(ps, device=device).unsqueeze(1), 0)
        cdf = probs.cumsum(dim=-1)
        draws = [r.rng.random() for r in picked if r.rng is not None]
        u = torch.tensor(draws, dtype=cdf.dtype, device=device)
        pick = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True)
        pick = pick.clamp_(max=vocab - 1)
        if order is not None:
            pick = order.gather(1, pick)
        for i, tok in zip(sampled, pick.squeeze(1).tolist(), strict=True):
            tokens[i] = int(tok)
        return tokens
