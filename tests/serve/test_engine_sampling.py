"""Batched sampling of plain-temperature rows picks exactly sample_next's token for the same generator state (the
engine relies on it: a seeded request gives the same text alone, batched, or through `gigafactory generate`)."""

from __future__ import annotations

import torch

from gigafactory.inference.sampling import SamplingParams, sample_next
from gigafactory.serve.model_runner import ModelRunner
from gigafactory.serve.sequence import Sequence


def test_batched_plain_temperature_sampling_equals_sample_next():
    torch.manual_seed(0)
    params = [SamplingParams(temperature=t, max_tokens=5) for t in (0.8, 1.3, 2.0, 1e-300, 0.05)]
    others = [SamplingParams(temperature=0.8, top_k=5), SamplingParams(temperature=0.8, min_p=0.1),
              SamplingParams(temperature=0), SamplingParams(temperature=0.8, logit_bias={3: 5.0})]
    for trial in range(40):
        logits = torch.randn(len(params) + len(others) + 1, 300) * 4
        logits[-1, 7] = float("nan")  # a broken row: left to sample_next, which says what is wrong
        all_params = params + others + [params[0]]
        seqs = [Sequence([1], p, None, lambda text, fin: None, seed=trial * 100 + i) for i, p in enumerate(all_params)]
        batched = ModelRunner.sample_batch(seqs, logits)
        assert batched[len(params):] == [None] * (len(others) + 1)
        for i, p in enumerate(params):
            alone = sample_next(logits[i], p, torch.Generator().manual_seed(trial * 100 + i))
            assert batched[i] == alone, (trial, i, p.temperature)


def test_logprob_requests_are_left_to_the_per_row_sampler():
    seq = Sequence([1], SamplingParams(temperature=0.8), None, lambda text, fin: None, seed=1, logprobs=2)
    assert ModelRunner.sample_batch([seq], torch.randn(1, 50)) == [None]
