"""The dynamic KV layout: one left-padded ``DynamicCache`` for the whole batch.

Real tokens of every row sit at the right end, so one ``[B, 1]`` query per step appends a column
for all rows. Newcomers are merged by left-padding the shorter side with zeros and concatenating on
the batch dimension; finished rows go with ``index_select`` and leading columns that are padding for
every remaining row are trimmed. The model sees real positions through ``position_ids`` and ignores
the padding through the attention mask, so each row computes what it would alone.

A prefill is left-padded the same way (:func:`left_padded`, :class:`PaddedPrefill`): the batching
engine merges it into its running cache, the static engine copies it into its slots.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .request import Request

__all__ = ["PaddedKV", "PaddedPrefill", "left_pad", "left_padded"]


def left_padded(
    prompts: Sequence[Sequence[int]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids, mask, position_ids)`` of prompts left-padded to the longest one."""
    width = max(len(p) for p in prompts)
    ids = [[0] * (width - len(p)) + list(p) for p in prompts]
    real = [[False] * (width - len(p)) + [True] * len(p) for p in prompts]
    input_ids = torch.tensor(ids, dtype=torch.long, device=device)
    mask = torch.tensor(real, dtype=torch.bool, device=device)
    # Padding gets position 0; it is masked out, the value only has to be valid.
    position_ids = (mask.long().cumsum(-1) - 1).clamp_(min=0)
    return input_ids, mask, position_ids


@dataclass(slots=True)
class PaddedPrefill:
    """The prefill of some requests: its ``DynamicCache`` (left-padded, ``[n, heads, width, dim]``
    per layer), the ``[n, width]`` bool mask of real tokens, the last position's logits, and
    every position's (``[n, width, V]``) when a request asked for its prompt's logprobs."""

    cache: Any
    mask: torch.Tensor
    logits: torch.Tensor
    prompt_logits: torch.Tensor | None = None

    def zero_padding(self) -> None:
        """Keys/values computed for padding are never attended to, but a NaN there would still
        poison a row (0 * NaN); zeros are safe whatever the attention kernel does."""
        pad = ~self.mask[:, None, :, None]
        for layer in self.cache.layers:
            layer.keys.masked_fill_(pad, 0)
            layer.values.masked_fill_(pad, 0)

    def select(self, keep: list[int], longest: int) -> None:
        """Keeps rows ``keep`` only, in that order; ``longest``: the longest prompt among them
        (left padding only ever needs to cover it). A row named several times is forked: the
        ``n`` choices of one prompt get copies of its K/V, whichever layout they join."""
        idx = torch.tensor(keep, device=self.mask.device)
        trim = self.mask.shape[1] - longest
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, idx)[:, :, trim:]
            layer.values = layer.values.index_select(0, idx)[:, :, trim:]
        self.mask = self.mask.index_select(0, idx)[:, trim:]


class PaddedKV:
    """The running batch's left-padded cache and its ``[B, L]`` mask (generation thread)."""

    __slots__ = ("_ones", "cache", "mask")

    def __init__(self, max_batch_size: int, device: torch.device) -> None:
        self.cache: Any = None
        self.mask: torch.Tensor | None = None  # [B, L] bool, True where a real token is cached
        self._ones = torch.ones((max_batch_size, 1), dtype=torch.bool, device=device)

    def join(self, first: int, prefill: PaddedPrefill) -> None:
        """Appends the prefilled rows after the ``first`` running ones."""
        if not first or self.cache is None or self.mask is None:
            self.cache, self.mask = prefill.cache, prefill.mask
            return
        mask = prefill.mask
        width = max(self.mask.shape[1], mask.shape[1])
        # Everything is built before anything is assigned, so a failure leaves the batch intact.
        merged = [
            (
                torch.cat([left_pad(old.keys, width), left_pad(new.keys, width)]),
                torch.cat([left_pad(old.values, width), left_pad(new.values, width)]),
            )
            for old, new in zip(self.cache.layers, prefill.cache.layers, strict=True)
        ]
        merged_mask = torch.cat(
            [
                F.pad(self.mask, (width - self.mask.shape[1], 0), value=False),
                F.pad(mask, (width - mask.shape[1], 0), value=False),
            ]
        )
        for layer, (keys, values) in zip(self.cache.layers, merged, strict=True):
            layer.keys, layer.values = keys, values
        self.mask = merged_mask

    def grow(self, batch: int) -> torch.Tensor:
        """Adds the column of this step's token to the mask of ``batch`` rows; returns the mask."""
        assert self.mask is not None
        self.mask = torch.cat([self.mask, self._ones[:batch]], dim=1)
        return self.mask

    def keep(self, rows: list[Request], keep: list[int]) -> list[Request]:
        """Keeps rows ``keep`` (increasing, not empty) of ``rows``; returns them in row order."""
        assert self.mask is not None
        idx = torch.tensor(keep, device=self.mask.device)
        kept = [rows[i] for i in keep]
        trim = self.mask.shape[1] - max(r.n_ctx for r in kept)
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, idx)[:, :, trim:]
            layer.values = layer.values.index_select(0, idx)[:, :, trim:]
        self.mask = self.mask.index_select(0, idx)[:, trim:]
        return kept

    def reset(self) -> None:
        self.cache = None
        self.mask = None


def left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    """``t`` (``[..., length, dim]``) left-padded with zeros to ``width`` positions."""
    missing = width - t.shape[-2]
    return F.pad(t, (0, 0, missing, 0)) if missing else t
