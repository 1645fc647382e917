"""The sampler: one next token per row of a step's logits, by each row's own parameters.

The pipeline of one step, each stage vectorised over the rows that ask for it, so that rows
without a feature pay nothing (a batch where no row asks for any runs exactly the old path):

1. logit processors that change a row's logits (:meth:`Sampler._shape`, only rows whose
   request is ``shaped``): ``logit_bias``; ``repetition_penalty`` (Hugging Face: a seen token's
   positive logit is divided by the penalty, a negative one multiplied; prompt and generated
   tokens); ``presence_penalty`` and ``frequency_penalty`` (OpenAI: minus ``presence`` once a
   token was generated, minus ``frequency`` times its count, over the generated tokens); the
   grammar mask of a constrained row (``workers.engines.grammar``);
2. greedy rows take the argmax (computed inside the decode step where the runner already did, as
   the CUDA graphs do, unless the row's logits were shaped);
3. the other rows get temperature, top-k, top-p and min-p, then an inverse-CDF draw with one
   uniform from the row's own seeded generator, so that a row's draw depends only on its logits
   and its seed, never on its batch mates;
4. rows that asked for logprobs get the log-softmax of their shaped logits after temperature
   (temperature 0: of the logits as they are) at the sampled token and its top k alternatives.
   Tokens that a grammar or a bias of -inf ruled out are left out of the alternatives.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .api import TokenLogprob
from .grammar import grammar_bias
from .request import Request

__all__ = ["Sampler", "prompt_logprobs"]


class Sampler:
    """Samples one token per row (generation thread)."""

    __slots__ = ()

    def sample(
        self, logits: torch.Tensor, rows: Sequence[Request], argmax: torch.Tensor | None = None
    ) -> tuple[list[int], list[TokenLogprob | None] | None]:
        """``logits`` ``[len(rows), V]``; ``argmax`` (``[len(rows)]``), when the step computed it
        already, saves computing it again. Returns the tokens and, when any row asked for them,
        the logprobs of each row (None for rows that did not ask)."""
        shaped = [i for i, r in enumerate(rows) if r.shaped]
        if shaped:
            logits = self._shape(logits, rows, shaped)
            argmax = None  # a shaped greedy row's argmax is not the step's
        sampled = [i for i, r in enumerate(rows) if not r.greedy]
        if len(sampled) < len(rows):
            # A long tensor's tolist() holds Python ints already.
            tokens: list[int] = (argmax if argmax is not None else logits.argmax(dim=-1)).tolist()
        else:
            tokens = [0] * len(rows)
        if sampled:
            self._draw(logits, rows, sampled, tokens)
        if not any(r.params.logprobs is not None for r in rows):
            return tokens, None
        return tokens, _logprobs(logits, rows, tokens)

    # ------------------------------------------------------------------ stages

    @staticmethod
    def _shape(logits: torch.Tensor, rows: Sequence[Request], shaped: list[int]) -> torch.Tensor:
        """A float copy of ``logits`` whose ``shaped`` rows have their processors applied (the
        input may be a CUDA graph's output buffer: it is never written)."""
        device = logits.device
        whole = len(shaped) == len(rows)
        if whole:
            sub = logits.float()
            if sub is logits:
                sub = sub.clone()
        else:
            out = logits.float()
            if out is logits:
                out = out.clone()
            idx = torch.tensor(shaped, device=device)
            sub = out.index_select(0, idx)
        vocab = sub.shape[1]
        reqs = [rows[i] for i in shaped]

        bias_rows, bias_ids, bias_vals = [], [], []
        for j, r in enumerate(reqs):
            for token, bias in r.params.logit_bias:
                if token < vocab:
                    bias_rows.append(j)
                    bias_ids.append(token)
                    bias_vals.append(float(bias))
        if bias_rows:
            sub.index_put_(
                (torch.tensor(bias_rows, device=device), torch.tensor(bias_ids, device=device)),
                torch.tensor(bias_vals, device=device),
                accumulate=True,
            )

        rep = [j for j, r in enumerate(reqs) if r.params.repetition_penalty != 1.0]
        if rep:
            seen = _token_sets([reqs[j].prompt + reqs[j].out_ids for j in rep], vocab, device)
            penalty = torch.tensor([reqs[j].params.repetition_penalty for j in rep], device=device)
            part = sub[rep]
            scaled = torch.where(part < 0, part * penalty[:, None], part / penalty[:, None])
            sub[rep] = torch.where(seen, scaled, part)

        pen = [
            j
            for j, r in enumerate(reqs)
            if (r.params.presence_penalty or r.params.frequency_penalty) and r.out_ids
        ]
        if pen:
            counts = _token_counts([reqs[j].out_ids for j in pen], vocab, device)
            presence = torch.tensor([reqs[j].params.presence_penalty for j in pen], device=device)
            frequency = torch.tensor([reqs[j].params.frequency_penalty for j in pen], device=device)
            sub[pen] = sub[pen] - counts * frequency[:, None] - (counts > 0).float() * presence[:, None]

        constrained = [j for j, r in enumerate(reqs) if r.grammar is not None]
        if constrained:
            states = [g for j in constrained if (g := reqs[j].grammar) is not None]
            mask = grammar_bias(states, vocab)
            if mask.device != device:
                mask = mask.to(device)
            if len(constrained) == len(reqs):
                sub += mask
            else:
                cidx = torch.tensor(constrained, device=device)
                sub.index_copy_(0, cidx, sub.index_select(0, cidx) + mask)

        if whole:
            return sub
        out.index_copy_(0, idx, sub)
        return out

    @staticmethod
    def _draw(logits: torch.Tensor, rows: Sequence[Request], sampled: list[int], tokens: list[int]) -> None:
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
        min_ps = [r.params.min_p for r in picked]
        if any(min_ps):
            # min-p: drop tokens less likely than min_p times the most likely one.
            floor = probs.max(dim=-1, keepdim=True).values * torch.tensor(min_ps, device=device).unsqueeze(1)
            probs = probs.masked_fill(probs < floor, 0)
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


def _logprobs(logits: torch.Tensor, rows: Sequence[Request], tokens: list[int]) -> list[TokenLogprob | None]:
    """The logprobs of the rows that asked: the sampled token's and the top k."""
    asked = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    device = logits.device
    sub = logits[asked].float() if len(asked) < len(rows) else logits.float()
    temps = [rows[i].params.temperature or 1.0 for i in asked]
    if any(t != 1.0 for t in temps):
        sub = sub / torch.tensor(temps, device=device).unsqueeze(1)
    logp = torch.log_softmax(sub, dim=-1)
    chosen = logp.gather(1, torch.tensor([tokens[i] for i in asked], device=device).unsqueeze(1))
    k = max(rows[i].params.logprobs or 0 for i in asked)
    top_vals: list[list[float]] = [[] for _ in asked]
    top_ids: list[list[int]] = [[] for _ in asked]
    if k:
        values, ids = logp.topk(k, dim=-1)
        top_vals, top_ids = values.tolist(), ids.tolist()
    out: list[TokenLogprob | None] = [None] * len(rows)
    for j, (i, lp) in enumerate(zip(asked, chosen.squeeze(1).tolist(), strict=True)):
        want = rows[i].params.logprobs or 0
        top = [(t, v) for t, v in zip(top_ids[j][:want], top_vals[j][:want], strict=True) if v != -math.inf]
        out[i] = TokenLogprob(tokens[i], lp, top)
    return out


def prompt_logprobs(
    logits: torch.Tensor, prompt: Sequence[int], k: int, temperature: float
) -> list[TokenLogprob | None]:
    """The logprobs of each prompt token given the ones before it, from the prefill's logits of
    the prompt's positions (``[len(prompt), V]``); the first token has none."""
    logp = torch.log_softmax(logits[:-1].float() / (temperature or 1.0), dim=-1)
    ids = torch.tensor(list(prompt[1:]), device=logits.device)
    chosen = logp.gather(1, ids.unsqueeze(1)).squeeze(1).tolist()
    tops: list[list[tuple[int, float]]] = [[] for _ in chosen]
    if k and len(chosen):
        values, top_ids = logp.topk(k, dim=-1)
        tops = [list(zip(i, v, strict=True)) for i, v in zip(top_ids.tolist(), values.tolist(), strict=True)]
    out: list[TokenLogprob | None] = [None]
    out.extend(TokenLogprob(int(t), lp, top) for t, lp, top in zip(prompt[1:], chosen, tops, strict=True))
    return out


def _padded(seqs: Sequence[Sequence[int]], pad: int, device: torch.device) -> torch.Tensor:
    width = max(1, max(len(s) for s in seqs))
    return torch.tensor([list(s) + [pad] * (width - len(s)) for s in seqs], dtype=torch.long, device=device)


def _token_counts(seqs: Sequence[Sequence[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """``[len(seqs), vocab]`` float: how often each token occurs in each sequence."""
    ids = _padded(seqs, vocab, device)  # the pad lands in an extra column, dropped after
    counts = torch.zeros((len(seqs), vocab + 1), device=device)
    counts.scatter_add_(1, ids, torch.ones(ids.shape, device=device))
    return counts[:, :vocab]


def _token_sets(seqs: Sequence[Sequence[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """``[len(seqs), vocab]`` bool: which tokens occur in each sequence."""
    ids = _padded(seqs, vocab, device)
    seen = torch.zeros((len(seqs), vocab + 1), dtype=torch.bool, device=device)
    seen.scatter_(1, ids, True)
    return seen[:, :vocab]
