"""Prefix caching over the slot KV cache: a prompt that starts like one already in a cache row (a shared system
prompt, the earlier turns of a chat) copies those keys/values instead of recomputing them.

Each row's content is remembered as a chain of block keys: key_i = hash(key_{i-1}, tokens of block i), BLOCK tokens
a block, so two rows share a prefix of i blocks exactly when their first i keys are equal. A row keeps its content
after its sequence finishes (rows are reused without clearing, and idle decode rows write only the last position),
so a free row with a matching prefix is taken as it is, and a running row's prefix is copied into a free row.
At least one prompt token is always prefilled: its logits give the first sampled token. A row whose prompt is still
being prefilled in chunks lends only the blocks already written.
"""

from __future__ import annotations

from gigafactory.serve.kv_cache import SlotKVCache

BLOCK = 16  # tokens per block: the granularity of matching


def block_keys(ids: list[int]) -> list[int]:
    keys, key = [], 0
    for start in range(0, len(ids) - BLOCK + 1, BLOCK):
        key = hash((key, tuple(ids[start:start + BLOCK])))
        keys.append(key)
    return keys


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class PrefixCache:
    def __init__(self, kv: SlotKVCache, enabled: bool = True):
        self.kv, self.enabled = kv, enabled
        self.content: list[list[int]] = [[] for _ in range(kv.n_slots)]  # block keys of what each row holds
        self.written = [0] * kv.n_slots  # positions of that content actually written (a chunked prefill is partial)
        self.used: set[int] = set()

    def assign(self, prompt: list[int]) -> tuple[int, int, int | None]:
        """A row for this prompt: (slot, cached prompt tokens, row to copy them from or None when already there)."""
        wanted = block_keys(prompt[:len(prompt) - 1]) if self.enabled else []  # leave one token to prefill
        best, donor = 0, None
        for slot, keys in enumerate(self.content):
            n = _common(wanted, keys)
            if n > best or (n == best and n and donor in self.used and slot not in self.used):
                best, donor = n, slot  # on a tie prefer a free row: no copy needed
        if best and donor not in self.used:
            slot, source = self.kv.allocate(donor), None
        else:
            slot, source = self.kv.allocate(), donor if best else None
        self.used.add(slot)
        self.content[slot] = block_keys(prompt)  # what the row holds once this prompt is prefilled
        self.written[slot] = best * BLOCK if source is None else 0
        return slot, best * BLOCK, source

    def available(self, slot: int, prompt: list[int], n_tokens: int) -> int:
        """How many of the first n_tokens of prompt row `slot` holds now, in whole blocks: fewer when its owner's
        chunked prefill has not reached them yet, none when its owner failed."""
        blocks = min(n_tokens, self.written[slot]) // BLOCK
        return BLOCK * min(blocks, _common(block_keys(prompt[:blocks * BLOCK]), self.content[slot]))

    def wrote(self, slot: int, n_tokens: int) -> None:
        """The row's owner has written positions [0, n_tokens) of its content."""
        self.written[slot] = n_tokens

    def forget(self, slot: int) -> None:
        """The row's content is unknown (its prefill or decode failed): nobody may copy from it."""
        self.content[slot], self.written[slot] = [], 0

    def release(self, slot: int, ids: list[int] | None) -> None:
        """The row's sequence is done; `ids` are the tokens whose keys/values it wrote (None: unknown, forget it).
        The last position is excluded: idle rows in a batched decode write there."""
        self.used.discard(slot)
        kept = ids[: self.kv.max_len - 1] if ids else []
        self.content[slot], self.written[slot] = block_keys(kept), len(kept)
        self.kv.free(slot)
