"""Prefix caching over the paged KV cache: a prompt that starts like one already computed (a shared system prompt,
the earlier turns of a chat) shares those blocks instead of recomputing them.

A full block is known by its content key: key_i = hash(key_{i-1}, tokens of block i), so two sequences share a
prefix of i blocks exactly when their first i keys are equal. A block is registered under its key as soon as a
sequence is admitted to write it ("pending"), and becomes shareable once that write is done. A prompt whose next
block is pending waits for it rather than computing it a second time: 32 requests arriving together with one system
prompt compute it once. Registered blocks keep their content after their sequences end, until the cache hands them
out again (least recently freed first); only full blocks are shared, and at least one prompt token is always
prefilled (its logits give the first sampled token).
"""

from __future__ import annotations

from gigafactory.serve.kv_cache import BLOCK_SIZE as BLOCK
from gigafactory.serve.kv_cache import PagedKVCache
from gigafactory.serve.sequence import Sequence


def next_key(previous: int, block: list[int]) -> int:
    return hash((previous, tuple(block)))


def block_keys(ids: list[int], block_size: int = BLOCK) -> list[int]:
    keys, key = [], 0
    for start in range(0, len(ids) - block_size + 1, block_size):
        key = next_key(key, ids[start:start + block_size])
        keys.append(key)
    return keys


class PrefixCache:
    def __init__(self, kv: PagedKVCache, enabled: bool = True):
        self.kv, self.enabled, self.block_size = kv, enabled, kv.block_size
        self.block_of: dict[int, int] = {}  # content key -> block
        self.key_of: dict[int, int] = {}  # block -> content key
        self.writer: dict[int, int] = {}  # block -> id of the sequence that wrote (or writes) it
        self.pending: set[int] = set()  # keys whose block is still being written
        kv.on_reuse, kv.holds_content = self._forget, self.key_of.__contains__

    def match(self, prompt: list[int]) -> tuple[list[int], list[int], bool]:
        """(keys of the prompt's full blocks, leaving its last token out; the blocks of its longest computed prefix;
        whether the block after that prefix is being written by another sequence - then wait for it)."""
        if not self.enabled:
            return [], [], False
        keys = block_keys(prompt[:len(prompt) - 1], self.block_size)
        shared = []
        for key in keys:
            block = self.block_of.get(key)
            if block is None:
                break
            if key in self.pending:
                return keys, shared, True
            shared.append(block)
        return keys, shared, False

    def claim(self, seq: Sequence, keys: list[int]) -> None:
        """`seq` was admitted: its shared blocks are its first keys, and the full prompt blocks it will write are
        registered as pending under their keys (a key already known keeps its block)."""
        if not self.enabled:
            return
        n_shared = seq.cached_tokens // self.block_size
        seq.block_keys = keys[:n_shared]
        for i in range(n_shared, len(keys)):
            if keys[i] not in self.block_of:
                self._register(keys[i], seq.block_table[i], seq.id)
                self.pending.add(keys[i])

    def wrote(self, seq: Sequence) -> None:
        """Positions [0, seq.kv_len) of `seq` are written: its full blocks among them become shareable."""
        if not self.enabled:
            return
        tokens, bs = None, self.block_size
        while (len(seq.block_keys) + 1) * bs <= seq.kv_len:
            i = len(seq.block_keys)
            if tokens is None:
                tokens = seq.prompt_ids + seq.output_ids
            key = next_key(seq.block_keys[-1] if i else 0, tokens[i * bs:(i + 1) * bs])
            seq.block_keys.append(key)
            block = self.block_of.get(key)
            if block is None:
                self._register(key, seq.block_table[i], seq.id)
            elif block == seq.block_table[i]:
                self.pending.discard(key)

    def abandon(self, seq: Sequence) -> None:
        """`seq` ends (finished, aborted or failed): blocks it registered but has not written are forgotten, so
        nobody waits for them or shares them. Its written full blocks stay valid (a failed forward writes only
        positions after them)."""
        for block in seq.block_table:
            if self.key_of.get(block) in self.pending and self.writer.get(block) == seq.id:
                self._forget(block)

    def writer_running(self, blocks: list[int], running_ids: set[int]) -> int | None:
        """The id of a running sequence that wrote one of these blocks, if any."""
        return next((self.writer[b] for b in blocks if self.writer.get(b) in running_ids), None)

    def _register(self, key: int, block: int, seq_id: int) -> None:
        self._forget(block)
        self.block_of[key], self.key_of[block], self.writer[block] = block, key, seq_id

    def _forget(self, block: int) -> None:
        key = self.key_of.pop(block, None)
        self.writer.pop(block, None)
        if key is not None and self.block_of.get(key) == block:
            del self.block_of[key]
            self.pending.discard(key)
