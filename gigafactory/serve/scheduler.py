"""Continuous batching: every step, waiting requests take free cache rows and finished ones give theirs back.
Rows are handed out through the prefix cache, so a prompt that starts like a cached one skips that part's prefill."""

from __future__ import annotations

from collections import deque

from gigafactory.serve.kv_cache import SlotKVCache
from gigafactory.serve.prefix_cache import PrefixCache
from gigafactory.serve.sequence import Sequence


class Scheduler:
    def __init__(self, kv: SlotKVCache, max_prefills_per_step: int = 4, prefix_cache: bool = True):
        self.kv = kv
        self.prefix = PrefixCache(kv, enabled=prefix_cache)
        self.max_prefills_per_step = max_prefills_per_step  # bounds how long one step stalls the decoders
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def admit(self) -> list[Sequence]:
        """First come, first served: move waiting sequences into free rows; they need a prefill this step."""
        admitted = []
        while self.waiting and self.kv.n_free and len(admitted) < self.max_prefills_per_step:
            seq = self.waiting.popleft()
            if seq.finish_reason is not None:  # aborted while it waited
                continue
            seq.slot, seq.cached_tokens, seq.copy_from = self.prefix.assign(seq.prompt_ids)
            self.running.append(seq)
            admitted.append(seq)
        return admitted

    def retire(self) -> None:
        """Give back the rows of finished (or aborted) sequences; drop aborted ones that never started."""
        for seq in [s for s in self.running if s.finish_reason is not None]:
            written = None if seq.finish_reason == "error" else (seq.prompt_ids + seq.output_ids)[:seq.kv_len]
            self.prefix.release(seq.slot, written)
            self.running.remove(seq)
        if any(s.finish_reason is not None for s in self.waiting):
            self.waiting = deque(s for s in self.waiting if s.finish_reason is None)

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running
