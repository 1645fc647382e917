"""The static KV layout: one slot per running request, allocated once, at fixed addresses.

Per layer, K and V tensors ``[max_batch_size, kv_heads, L, head_dim]``, ``L`` = ``max_seq`` rounded
up to 16 (:class:`SlotCache`, a transformers ``Cache`` of :class:`SlotLayer`). Slot ``s`` holds one
request, position ``p`` of its sequence at index ``p``: a row's valid entries are exactly
``[0, n_ctx)``, so the attention mask is ``arange(L) <= position`` and can be computed inside the
decode step from the position tensor.

Running requests always occupy slots ``0..n-1`` (row index == slot index), so a step of bucket
``b`` works on the views ``keys[:b]`` with no gather. :class:`SlotKV` keeps that invariant: a
prefill (left-padded, see ``kv_padded``) is rotated to start at index 0 and copied into the next
free slots; when requests leave, survivors from the tail are copied into the holes (only their
valid prefix), which is cheap next to one decode step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers.cache_utils import Cache, StaticLayer

from .kv_padded import PaddedPrefill
from .request import Request

__all__ = ["SEQ_ALIGN", "SlotCache", "SlotKV", "SlotLayer"]

# The memory-efficient SDPA kernel wants the mask's last dimension aligned to 16; otherwise it pads
# the mask on every call.
SEQ_ALIGN = 16


class SlotLayer(StaticLayer):
    """One layer's K/V for every slot, ``[slots, kv_heads, L, head_dim]``, allocated up front.

    ``update`` writes row ``r``'s single new key/value at ``positions[r]`` of slot ``r`` (the rows
    of a step are slots ``0..b-1``) and returns the static K/V of those slots, as views.
    """

    # Allocated in __init__ and never released, unlike the base class's lazily made tensors.
    keys: torch.Tensor  # type: ignore[assignment]
    values: torch.Tensor  # type: ignore[assignment]

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__(max_cache_len=keys.shape[2])
        self.keys = keys
        self.values = values
        self.device = keys.device
        self.batch_size, self.num_heads = keys.shape[0], keys.shape[1]
        self.k_head_dim, self.v_head_dim = keys.shape[3], values.shape[3]
        self.is_initialized = True
        # ``[b, 1]`` write positions of the step being run; set by ``SlotCache.begin_step``.
        self.positions: torch.Tensor | None = None
        # How many leading positions the step's attention reads (None: all of them).
        self.window: int | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Nothing to do: the tensors exist from construction on, at fixed addresses."""

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        positions = self.positions
        if positions is None or key_states.shape[2] != 1:
            raise RuntimeError("SlotLayer only takes one-token decode steps started by SlotCache.begin_step")
        rows = key_states.shape[0]
        keys, values = self.keys[:rows], self.values[:rows]
        # scatter_ along the position axis with a [b, heads, 1, dim] index: a device-side write,
        # no host sync, so it can be captured.
        index = positions.view(rows, 1, 1, 1)
        keys.scatter_(2, index.expand(key_states.shape), key_states)
        values.scatter_(2, index.expand(value_states.shape), value_states)
        if self.window is not None:
            # Views of the positions in use: attention reads window, not all L, positions.
            return keys[:, :, : self.window], values[:, :, : self.window]
        return keys, values

    def get_seq_length(self) -> int:
        # Per-row lengths live in the engine; the engine always passes position_ids and a ready
        # 4-D mask, so nothing in the model needs one length for the batch.
        return 0


class SlotCache(Cache):
    """A transformers ``Cache`` of ``SlotLayer``s (see the module doc for the layout)."""

    layers: list[SlotLayer]  # type: ignore[assignment]

    def __init__(self, layers: list[SlotLayer]) -> None:
        super().__init__(layers=list(layers))

    @classmethod
    def allocate(
        cls, like: Sequence[tuple[torch.Tensor, torch.Tensor]], slots: int, length: int
    ) -> SlotCache:
        """Zeroed K/V shaped after one ``(keys, values)`` pair per layer (any batch and length):
        zeros, so that padding rows attending to a never-used position stay finite."""
        layers = []
        for keys, values in like:
            k_shape = (slots, keys.shape[1], length, keys.shape[3])
            v_shape = (slots, values.shape[1], length, values.shape[3])
            k = torch.zeros(k_shape, dtype=keys.dtype, device=keys.device)
            v = torch.zeros(v_shape, dtype=values.dtype, device=values.device)
            layers.append(SlotLayer(k, v))
        return cls(layers)

    @property
    def length(self) -> int:
        """Positions per slot (``L``)."""
        return int(self.layers[0].keys.shape[2])

    def begin_step(self, positions: torch.Tensor, window: int | None = None) -> None:
        """``positions``: ``[b, 1]`` long, where each row's token of this step goes; ``window``:
        how many leading positions attention reads (every position of a row in the step must be
        below it), None for all ``L``, as a CUDA graph needs."""
        for layer in self.layers:
            layer.positions = positions
            layer.window = window

    def grow(self, length: int) -> bool:
        """Makes every slot hold ``length`` positions (more than now): new zeroed tensors, the
        old contents copied in. Only for a cache no CUDA graph was captured on (it moves the
        tensors). False when ``length`` is not more than ``L``."""
        if length <= self.length:
            return False
        for layer in self.layers:
            for name in ("keys", "values"):
                old = getattr(layer, name)
                new = old.new_zeros((old.shape[0], old.shape[1], length, old.shape[3]))
                new[:, :, : old.shape[2]] = old
                setattr(layer, name, new)
            layer.max_cache_len = length
        return True

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in (layer.keys, layer.values))

    def load(self, first_slot: int, prefill: Any, lengths: Sequence[int]) -> None:
        """Copies a left-padded prefill cache (``[n, heads, width, dim]`` per layer, row ``i``'s
        ``lengths[i]`` tokens at its right end) into slots ``first_slot..first_slot+n-1``,
        starting at index 0."""
        n = len(lengths)
        width = prefill.layers[0].keys.shape[2]
        index: torch.Tensor | None = None
        if any(length != width for length in lengths):
            # Rotating each row left by its padding puts token p at index p; the padding lands
            # after the real tokens, where the mask hides it until decoding overwrites it.
            pad = torch.tensor([width - length for length in lengths], device=self.layers[0].device)
            index = (torch.arange(width, device=pad.device) + pad[:, None]) % width
        for layer, new in zip(self.layers, prefill.layers, strict=True):
            for dst, src in ((layer.keys, new.keys), (layer.values, new.values)):
                if index is not None:
                    idx = index.to(src.device)[:, None, :, None].expand(n, src.shape[1], width, src.shape[3])
                    src = src.gather(2, idx)
                dst[first_slot : first_slot + n, :, :width] = src

    def move(self, src: Sequence[int], dst: Sequence[int], length: int) -> None:
        """Copies the first ``length`` positions of slots ``src`` into slots ``dst``."""
        device = self.layers[0].device
        s = torch.tensor(list(src), device=device)
        d = torch.tensor(list(dst), device=device)
        for layer in self.layers:
            # The right-hand side is gathered into a new tensor before the write: overlapping
            # source and destination sets would still be safe.
            layer.keys[d, :, :length] = layer.keys[s, :, :length]
            layer.values[d, :, :length] = layer.values[s, :, :length]


class SlotKV:
    """The running rows of the static engine in slots ``0..n-1`` (generation thread)."""

    __slots__ = ("cache", "slots")

    def __init__(self, cache: SlotCache) -> None:
        self.cache = cache
        self.slots = cache.layers[0].keys.shape[0]

    def join(self, first: int, reqs: Sequence[Request], prefill: PaddedPrefill) -> None:
        """Copies the prefilled ``reqs`` into slots ``first..``."""
        if first + len(reqs) > self.slots:  # the scheduler never lets this happen
            raise RuntimeError(f"{first} + {len(reqs)} rows exceed the {self.slots} slots")
        self.cache.load(first, prefill.cache, [r.n_ctx for r in reqs])

    def keep(self, rows: list[Request], keep: list[int]) -> list[Request]:
        """Keeps rows ``keep`` (indices into ``rows``, increasing, not empty) and restores the
        invariant that the running rows are slots ``0..n-1``: survivors beyond ``n`` move into
        the holes. Returns the rows in their new slot order."""
        n = len(keep)
        placed: list[Request | None] = [None] * n
        movers: list[int] = []
        for i in keep:
            if i < n:
                placed[i] = rows[i]
            else:
                movers.append(i)
        if movers:
            holes = [j for j, r in enumerate(placed) if r is None]
            self.cache.move(movers, holes, max(rows[i].n_ctx for i in movers))
            for j, i in zip(holes, movers, strict=True):
                placed[j] = rows[i]
        return [r for r in placed if r is not None]
