"""Runs the model over the paged KV cache: a step's prompt chunks and one token of every decoding sequence go
through ONE forward (tokens flattened into one row; only attention is split per sequence), then sampling.

The engine first plans the step's prompt chunks (`prefill`), then `decode` runs them together with the decodes.
The forward returns logits and sampling is a separate call per sequence, so the engine can end one request that
fails (bad numbers, a broken callback) without touching the others; if the batched forward itself raises, the
engine reruns each chunk and each decode alone (`forward_alone`, `decode_one`) so only the culprit fails.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields

import torch

from gigafactory.inference.cpu_weights import pack_for_cpu
from gigafactory.inference.sampling import SamplingParams, draw, sample_next, top_logprobs
from gigafactory.models import GrokModel
from gigafactory.models.grok.paged import PagedStep, Segment
from gigafactory.serve.kv_cache import PagedKVCache, blocks_for
from gigafactory.serve.prefix_cache import PrefixCache
from gigafactory.serve.sequence import Sequence


@dataclass
class Chunk:
    """Prompt tokens [start, end) of a sequence, to be written in this step's forward."""

    seq: Sequence
    start: int
    end: int


class ModelRunner:
    def __init__(self, model: GrokModel, kv: PagedKVCache, prefix: PrefixCache | None = None):
        """Lays the model's weights out for its device first (in place: the engine owns the model it serves)."""
        pack_for_cpu(model)
        self.model, self.kv, self.prefix = model, kv, prefix
        self.device = next(model.parameters()).device
        self.heads = model.cfg.n_kv_heads
        self.planned: list[Chunk] = []  # prompt chunks for the next decode() forward

    def prefill(self, seq: Sequence, budget: int) -> int:
        """Plan the next chunk of at most `budget` prompt tokens of `seq` for this step's forward; its size."""
        start = seq.prefilled
        end = min(len(seq.prompt_ids), start + budget)
        self.planned.append(Chunk(seq, start, end))
        return end - start

    def decode(self, seqs: list[Sequence]) -> list[tuple[Sequence, torch.Tensor]]:
        """One forward for the planned prompt chunks and one new token of each of `seqs`: (sequence, logits [V])
        for every sequence that samples now (each of `seqs`, and each prompt whose last chunk this was)."""
        chunks = [c for c in self.planned if c.seq.finish_reason is None]
        out = self.forward(chunks, seqs)
        self.planned = []
        return out

    def forward_alone(self, chunk: Chunk) -> list[tuple[Sequence, torch.Tensor]]:
        """One prompt chunk on its own (the fallback when a batched forward fails)."""
        return self.forward([chunk], [])

    def decode_one(self, seq: Sequence) -> torch.Tensor:
        """One sequence's decode on its own (the fallback when a batched forward fails): logits [V]."""
        return self.forward([], [seq])[0][1]

    @torch.inference_mode()
    def forward(self, chunks: list[Chunk], seqs: list[Sequence]) -> list[tuple[Sequence, torch.Tensor]]:
        if not chunks and not seqs:
            return []
        bs, kv = self.kv.block_size, self.kv
        tokens, positions, rows, segments, logit_rows, sampled = [], [], [], [], [], []
        if seqs:  # the decodes: one segment of len(seqs) rows with one query each
            for s in seqs:
                pos = s.length - 1
                tokens.append(s.output_ids[-1])
                positions.append(pos)
                rows.append(s.block_table[pos // bs] * bs + pos % bs)
            segments.append(Segment.build(0, [s.block_table[:blocks_for(s.length, bs)] for s in seqs],
                                          [[s.length - 1] for s in seqs], bs, self.heads, self.device))
            logit_rows.extend(range(len(seqs)))
            sampled.extend(seqs)
        for c in chunks:  # each prompt chunk: a segment of one row with end - start queries
            table = c.seq.block_table
            segments.append(Segment.build(len(tokens), [table[:blocks_for(c.end, bs)]], [list(range(c.start, c.end))],
                                          bs, self.heads, self.device))
            tokens.extend(c.seq.prompt_ids[c.start:c.end])
            positions.extend(range(c.start, c.end))
            rows.extend(kv.rows(table, c.start, c.end))
            if c.end == len(c.seq.prompt_ids):
                logit_rows.append(len(tokens) - 1)
                sampled.append(c.seq)
        step = PagedStep(kv.pool, torch.tensor(rows, dtype=torch.long, device=self.device), segments,
                         torch.tensor(logit_rows, dtype=torch.long, device=self.device))
        logits = self.model(torch.tensor([tokens], device=self.device), torch.tensor([positions], device=self.device),
                            step)[0]
        for s in seqs:
            s.kv_len = s.length
        for c in chunks:
            c.seq.prefilled = c.seq.kv_len = c.end
        if self.prefix is not None:
            for s in [*seqs, *(c.seq for c in chunks)]:
                self.prefix.wrote(s)
        return list(zip(sampled, logits))

    @staticmethod
    def sample_batch(seqs: list[Sequence], logits_NV: torch.Tensor) -> list[int | None]:
        """The next token of every row that samples with a plain temperature (no other setting, no logprobs), in a
        few batched ops instead of ~10 small ones per row; None for the other rows (`sample` handles them).

        Exactly sample_next's token for the same generator state: the same probabilities and one uniform number drawn
        from each row's generator (tests/serve/test_engine_sampling.py)."""
        rows = [i for i, s in enumerate(seqs) if s.logprobs is None and _plain_temperature(s.params)]
        out: list[int | None] = [None] * len(seqs)
        if not rows:
            return out
        logits = logits_NV[rows].double()  # sample_next: float32 logits, max subtracted in float64, then / T
        # A NaN or inf anywhere makes the row's float64 sum NaN or inf (float32 values cannot overflow it): one
        # reduction instead of isfinite's four passes. Other rows: sample_next says what is wrong.
        finite = torch.isfinite(logits.sum(-1)).tolist()
        temperature = torch.tensor([seqs[i].params.temperature for i in rows], dtype=torch.float64)
        probs = ((logits - logits.max(-1, keepdim=True).values) / temperature[:, None]).softmax(-1)
        uniform = torch.cat([torch.rand(1, dtype=torch.float64, generator=seqs[i].generator) if ok
                             else torch.zeros(1, dtype=torch.float64) for i, ok in zip(rows, finite)])
        for i, ok, token in zip(rows, finite, draw(probs.cpu(), uniform).tolist()):
            out[i] = token if ok else None
        return out

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


_DEFAULTS = {f.name: f.default if f.default is not MISSING else f.default_factory() for f in fields(SamplingParams)}


def _plain_temperature(params: SamplingParams) -> bool:
    """Temperature > 0 and every other setting (but max_tokens) at its default: no bias, penalty or filter."""
    return params.temperature > 0 and all(getattr(params, name) == default for name, default in _DEFAULTS.items()
                                          if name not in ("temperature", "max_tokens"))
