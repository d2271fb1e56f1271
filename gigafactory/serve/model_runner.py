"""Runs the model: prefill one sequence into its cache row, decode every running row in one forward, and sample.

The forwards return logits and sampling is a separate call per sequence, so the engine can end one request that
fails (bad numbers, a broken callback) without touching the others in the batch.
"""

from __future__ import annotations

import torch

from gigafactory.inference.sampling import sample_next, top_logprobs
from gigafactory.models import GrokModel
from gigafactory.serve.kv_cache import SlotKVCache
from gigafactory.serve.prefix_cache import PrefixCache
from gigafactory.serve.sequence import Sequence


class ModelRunner:
    def __init__(self, model: GrokModel, kv: SlotKVCache, prefix: PrefixCache | None = None):
        self.model, self.kv, self.prefix = model, kv, prefix
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def prefill(self, seq: Sequence, budget: int) -> torch.Tensor | None:
        """Write the next chunk of at most `budget` prompt tokens into the sequence's row (the first chunk starts after
        the prefix cache's part, copied in if it lives in another row). The logits for its first token once the
        whole prompt is in, else None."""
        if seq.prefilled == 0 and seq.cached_tokens:
            if seq.copy_from is not None:
                held = self.prefix.available(seq.copy_from, seq.prompt_ids, seq.cached_tokens) if self.prefix else 0
                seq.cached_tokens = held  # the source may hold less than planned (failed, or still prefilling)
                if held:
                    self.kv.copy_prefix(seq.copy_from, seq.slot, held)
            seq.prefilled = seq.cached_tokens
        start, end = seq.prefilled, min(len(seq.prompt_ids), seq.prefilled + budget)
        ids = torch.tensor([seq.prompt_ids[start:end]], device=self.device)
        positions = torch.arange(start, end, device=self.device)[None]
        logits = self.model(ids, positions, self.kv.rows(seq.slot, seq.slot + 1))[0, -1]
        seq.prefilled = seq.kv_len = end
        if self.prefix is not None:
            self.prefix.wrote(seq.slot, end)
        return logits if end == len(seq.prompt_ids) else None

    @torch.no_grad()
    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """Logits [hi, V] for one new token of each sequence (row = its slot). Runs rows [0, hi) where hi is past the
        highest used slot; idle rows in between get a dummy token at the last position (they write only there, in
        their own free row, which keeps the rest of its content for the prefix cache) and are ignored."""
        hi = max(s.slot for s in seqs) + 1
        tokens = torch.zeros(hi, 1, dtype=torch.long)
        positions = torch.full((hi, 1), self.kv.max_len - 1, dtype=torch.long)
        for s in seqs:
            tokens[s.slot, 0] = s.output_ids[-1]
            positions[s.slot, 0] = s.length - 1
            s.kv_len = s.length
        return self.model(tokens.to(self.device), positions.to(self.device), self.kv.rows(0, hi))[:, -1]

    @torch.no_grad()
    def decode_one(self, seq: Sequence) -> torch.Tensor:
        """One sequence alone, on its own row only: the fallback when a batched decode fails."""
        tokens = torch.tensor([[seq.output_ids[-1]]], device=self.device)
        positions = torch.tensor([[seq.length - 1]], device=self.device)
        seq.kv_len = seq.length
        return self.model(tokens, positions, self.kv.rows(seq.slot, seq.slot + 1))[0, -1]

    @staticmethod
    def sample(seq: Sequence, logits_V: torch.Tensor, greedy: int | None = None) -> int:
        """The sequence's next token with its own settings and generator (`greedy`: the batch's argmax, if known);
        records its logprobs when the request asked for them."""
        if greedy is not None and seq.params.plain_greedy:
            token = greedy
        else:
            token = sample_next(logits_V, seq.params, seq.generator, seq.output_ids)
        if seq.logprobs is not None:
            seq.token_logprobs.append((token, *top_logprobs(logits_V, token, seq.logprobs)))
        return token
