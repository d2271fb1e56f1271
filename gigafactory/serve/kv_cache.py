"""Paged KV cache: fixed-size blocks of one pool, handed to sequences through block tables, with reference counts.

A sequence reserves, when it is admitted, the blocks for its whole possible length (prompt + max_tokens, at most
the context), so a running sequence never waits for memory and nothing is ever preempted. Blocks of a prompt prefix
that another sequence already computed are shared (prefix_cache.py), not copied: they are full and never written
again, so sharing needs no copy-on-write. A freed block keeps its content for the prefix cache until it is handed
out again, least recently freed first. `n_slots` still bounds how many sequences run together (`--slots`).
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from gigafactory.models.config import ModelConfig
from gigafactory.models.grok.paged import BlockPool

BLOCK_SIZE = 16  # tokens per block: the granularity of allocation and of prefix sharing


def blocks_for(n_tokens: int, block_size: int = BLOCK_SIZE) -> int:
    return -(-n_tokens // block_size)


class PagedKVCache:
    def __init__(self, cfg: ModelConfig, n_slots: int, max_len: int, device, dtype=torch.float32,
                 block_size: int = BLOCK_SIZE, n_blocks: int | None = None):
        """n_blocks defaults to a full context for every slot (the memory of a slot cache), so block reservations
        never hold back a sequence that a free slot could take."""
        self.n_slots, self.max_len, self.block_size = n_slots, max_len, block_size
        self.n_blocks = n_blocks or n_slots * blocks_for(max_len, block_size)
        self.pool = BlockPool.allocate(cfg, self.n_blocks, block_size, device=device, dtype=dtype)
        self.refs = [0] * self.n_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(self.n_blocks))  # oldest freed first
        self._free_slots = n_slots
        self.on_reuse = lambda block: None  # the prefix cache forgets what a block held when it is handed out again
        self.holds_content = lambda block: False  # ...and says which free blocks are worth keeping longest

    @property
    def n_free(self) -> int:
        """Sequence slots free (what the queue bound and /ready count)."""
        return self._free_slots

    @property
    def blocks_in_use(self) -> int:
        return self.n_blocks - len(self._free)

    def can_admit(self, n_new_blocks: int, shared: list[int]) -> bool:
        """Is there a slot, and are there `n_new_blocks` free blocks besides the free ones among `shared`?"""
        reclaimed = sum(1 for b in shared if self.refs[b] == 0)
        return self._free_slots > 0 and len(self._free) - reclaimed >= n_new_blocks

    def admit(self, shared: list[int], n_new_blocks: int) -> list[int]:
        """Take a slot and build a block table: the `shared` blocks (one more reference each) then fresh ones."""
        self._free_slots -= 1
        for b in shared:
            if self.refs[b] == 0:
                del self._free[b]
            self.refs[b] += 1
        fresh = []
        for _ in range(n_new_blocks):
            b, _ = self._free.popitem(last=False)
            self.on_reuse(b)
            self.refs[b] = 1
            fresh.append(b)
        return list(shared) + fresh

    def release(self, table: list[int]) -> None:
        """A sequence is done: drop its references; its slot and unshared blocks come back (content kept)."""
        self._free_slots += 1
        for b in table:
            self.refs[b] -= 1
            if self.refs[b] == 0:
                self._free[b] = None
                if not self.holds_content(b):  # nothing to reuse: hand it out before blocks that hold a prefix
                    self._free.move_to_end(b, last=False)

    def rows(self, table: list[int], start: int, stop: int) -> list[int]:
        """Pool rows of positions [start, stop) of a sequence with this block table."""
        bs = self.block_size
        return [table[p // bs] * bs + p % bs for p in range(start, stop)]
