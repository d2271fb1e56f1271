"""Runs the model: prefill one sequence into its cache row, then decode every running row in one forward."""

from __future__ import annotations

import torch

from gigafactory.inference.sampling import sample_next
from gigafactory.models import GrokModel
from gigafactory.serve.kv_cache import SlotKVCache
from gigafactory.serve.sequence import Sequence


class ModelRunner:
    def __init__(self, model: GrokModel, kv: SlotKVCache):
        self.model, self.kv = model, kv
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def prefill(self, seq: Sequence) -> int:
        """Write the prompt's keys into the sequence's row and sample its first token."""
        ids = torch.tensor([seq.prompt_ids], device=self.device)
        positions = torch.arange(len(seq.prompt_ids), device=self.device)[None]
        logits = self.model(ids, positions, self.kv.rows(seq.slot, seq.slot + 1))
        return sample_next(logits[0, -1], seq.params, seq.generator)

    @torch.no_grad()
    def decode(self, seqs: list[Sequence]) -> list[int]:
        """One new token for each sequence. Runs rows [0, hi) where hi is past the highest used slot; idle rows
        in between get a dummy token at position 0 (they write only their own free row) and are ignored."""
        hi = max(s.slot for s in seqs) + 1
        tokens = torch.zeros(hi, 1, dtype=torch.long)
        positions = torch.zeros(hi, 1, dtype=torch.long)
        for s in seqs:
            tokens[s.slot, 0] = s.output_ids[-1]
            positions[s.slot, 0] = s.length - 1
        logits_BV = self.model(tokens.to(self.device), positions.to(self.device), self.kv.rows(0, hi))[:, -1]
        greedy = logits_BV.argmax(-1).tolist()  # one op for every temperature-0 row
        return [greedy[s.slot] if s.params.temperature == 0 else sample_next(logits_BV[s.slot], s.params, s.generator)
                for s in seqs]
