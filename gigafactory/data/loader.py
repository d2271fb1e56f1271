"""Deterministic, checkpointable loader of packed fixed-length sequences.

The token stream is cut into windows of seq_len + 1 tokens (inputs and shifted targets). Window order is a
seeded permutation per epoch. The loader's whole state is one number, the count of sequences consumed by all
data-parallel ranks together, so a run resumes at exactly the same place even with a different number of ranks.
"""

from __future__ import annotations

import numpy as np
import torch

from gigafactory.errors import UserError


class SeededOrder:
    """What every loader shares: n_windows rows visited in a seeded permutation per epoch, and a position that is one
    number (rows consumed by all data-parallel ranks together), checkpointed with what it must match on resume.
    Subclasses set n_windows, seq_len, seed and shuffle, and call `_start()`."""

    RESUME_HINT = "resume with the same data and data.seq_len/data.seed, or start a new run directory"

    def _start(self) -> None:
        self.consumed = 0
        self._epoch, self._perm = -1, None

    def _index(self, global_index: int) -> int:
        """The row at position `global_index` of the whole run's order."""
        epoch, offset = divmod(global_index, self.n_windows)
        if not self.shuffle:
            return offset
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
        return int(self._perm[offset])

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "seq_len": self.seq_len, "n_windows": self.n_windows, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seq_len", "n_windows", "seed"):
            if state[key] != getattr(self, key):
                raise UserError(f"checkpoint data loader has {key}={state[key]} but this run has {getattr(self, key)}; {self.RESUME_HINT}")
        self.consumed = int(state["consumed"])


class PackedSequenceLoader(SeededOrder):
    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int, dp_rank: int = 0, dp_size: int = 1, shuffle: bool = True):
        self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size
        self.seed, self.dp_rank, self.dp_size, self.shuffle = seed, dp_rank, dp_size, shuffle
        self.n_windows = (len(tokens) - 1) // seq_len
        if self.n_windows < batch_size * dp_size:
            raise UserError(
                f"the data has {len(tokens)} tokens, fewer than one global batch of {batch_size * dp_size} x {seq_len + 1}; "
                "add data or lower training.batch_size / data.seq_len"
            )
        self._start()

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each [batch_size, seq_len] int64, for this rank."""
        start = self.consumed + self.dp_rank * self.batch_size
        windows = [self._index(start + i) for i in range(self.batch_size)]
        self.consumed += self.batch_size * self.dp_size
        idx = np.asarray(windows)[:, None] * self.seq_len + np.arange(self.seq_len + 1)
        batch = torch.from_numpy(self.tokens[idx].astype(np.int64))
        return batch[:, :-1], batch[:, 1:]
