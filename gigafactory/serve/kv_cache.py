"""Slot-based KV cache: one preallocated row [G, max_len, Dh] per running sequence, handed out from a free list.

A row is reused without clearing: the model masks every cache position beyond a query's own, and a new sequence
rewrites positions 0..n before it attends to them, so stale keys of the previous owner are never seen.
Rows are handed out lowest first, so the running rows stay packed near 0 and decode runs on the prefix [0, hi)
(prefix_cache.py may hand out a higher free row that already holds the start of the prompt).
"""

from __future__ import annotations

import heapq

import torch

from gigafactory.models import KVCache
from gigafactory.models.config import ModelConfig


class SlotKVCache:
    def __init__(self, cfg: ModelConfig, n_slots: int, max_len: int, device, dtype=torch.float32):
        self.n_slots, self.max_len = n_slots, max_len
        self.cache = KVCache.allocate(cfg, n_slots, max_len, device=device, dtype=dtype)
        self._free = list(range(n_slots))  # a min-heap

    @property
    def n_free(self) -> int:
        return len(self._free)

    def allocate(self, slot: int | None = None) -> int:
        """The lowest free row, or the given free one (the prefix cache picks a row that holds a matching prefix)."""
        if slot is None:
            return heapq.heappop(self._free)
        self._free.remove(slot)
        heapq.heapify(self._free)
        return slot

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """Copy positions [0, n) of row src into row dst, every layer's keys and values."""
        for buf in (*self.cache.k, *self.cache.v):
            buf[dst, :, :n] = buf[src, :, :n]

    def free(self, slot: int) -> None:
        heapq.heappush(self._free, slot)

    def rows(self, start: int, stop: int) -> KVCache:
        """A cache of views on rows [start, stop); the model's scatter_ writes land in the shared buffers."""
        return KVCache([k[start:stop] for k in self.cache.k], [v[start:stop] for v in self.cache.v])
