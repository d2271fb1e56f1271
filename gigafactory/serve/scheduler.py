"""Continuous batching: every step, waiting requests take a slot and KV blocks, and finished ones give theirs back.

Admission goes through the prefix cache: a prompt that starts like a computed one shares those blocks and prefills
only the rest; one whose next block another request is computing right now waits a step for it instead.
"""

from __future__ import annotations

from collections import deque

from gigafactory.serve.kv_cache import PagedKVCache, blocks_for
from gigafactory.serve.prefix_cache import PrefixCache
from gigafactory.serve.sequence import Sequence


class Scheduler:
    def __init__(self, kv: PagedKVCache, prefix_cache: bool = True):
        self.kv = kv
        self.prefix = PrefixCache(kv, enabled=prefix_cache)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def admit(self) -> list[Sequence]:
        """First come, first served while slots and blocks last; a request waiting for a prefix block being
        written is passed over this step (the ones behind it may go)."""
        admitted = []
        running_ids = None
        for seq in list(self.waiting):
            if not self.kv.n_free:
                break
            if seq.finish_reason is not None:  # aborted while it waited (retire() drops it)
                continue
            keys, shared, wait = self.prefix.match(seq.prompt_ids)
            if wait:
                continue
            total = min(len(seq.prompt_ids) + seq.params.max_tokens, self.kv.max_len)
            fresh = blocks_for(total, self.kv.block_size) - len(shared)
            if not self.kv.can_admit(fresh, shared):
                break  # blocks are short: the oldest request gets them first
            if running_ids is None:
                running_ids = {s.id for s in self.running}
            seq.copy_from = self.prefix.writer_running(shared, running_ids)
            seq.block_table = self.kv.admit(shared, fresh)
            seq.cached_tokens = seq.prefilled = seq.kv_len = len(shared) * self.kv.block_size
            self.prefix.claim(seq, keys)
            self.waiting.remove(seq)
            self.running.append(seq)
            running_ids.add(seq.id)
            admitted.append(seq)
        return admitted

    def retire(self) -> None:
        """Give back the slots and blocks of finished (or aborted) sequences; drop aborted ones that never started."""
        for seq in [s for s in self.running if s.finish_reason is not None]:
            self.prefix.abandon(seq)
            self.kv.release(seq.block_table)
            self.running.remove(seq)
        if any(s.finish_reason is not None for s in self.waiting):
            self.waiting = deque(s for s in self.waiting if s.finish_reason is None)

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running
