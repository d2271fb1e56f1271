"""Sampling controls with OpenAI's ranges: logit_bias, presence/frequency penalties, min_p, tiny temperatures."""

from __future__ import annotations

import pytest
import torch

from gigafactory.errors import UserError
from gigafactory.inference.sampling import SamplingParams, draw, sample_next, top_logprobs

LOGITS = torch.tensor([2.0, 1.9, 0.5, -1.0])


def test_logit_bias_forces_or_bans_a_token():
    assert sample_next(LOGITS, SamplingParams(temperature=0, logit_bias={3: 100.0})) == 3
    assert sample_next(LOGITS, SamplingParams(temperature=0, logit_bias={0: -100.0})) == 1
    gen = torch.Generator().manual_seed(0)
    banned = SamplingParams(temperature=1.0, logit_bias={0: -100.0, 1: -100.0})
    assert {sample_next(LOGITS, banned, gen) for _ in range(200)} <= {2, 3}


def test_presence_and_frequency_penalties_count_generated_tokens():
    assert sample_next(LOGITS, SamplingParams(temperature=0, presence_penalty=0.2), output_ids=[0]) == 1
    assert sample_next(LOGITS, SamplingParams(temperature=0, presence_penalty=0.2), output_ids=[0, 0, 0, 1]) == 0
    assert sample_next(LOGITS, SamplingParams(temperature=0, frequency_penalty=0.2), output_ids=[0, 0, 0, 1]) == 1
    assert sample_next(LOGITS, SamplingParams(temperature=0, frequency_penalty=-2.0), output_ids=[2]) == 2  # negative: repeat


def test_min_p_cuts_the_tail():
    gen = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=1.0, min_p=0.5)  # p(2), p(3) < 0.5 x p(0): never drawn
    draws = {sample_next(LOGITS, params, gen) for _ in range(300)}
    assert draws == {0, 1}


def test_top_logprobs_are_the_model_distribution():
    lp, top = top_logprobs(LOGITS, 1, 2)
    expected = LOGITS.log_softmax(-1)
    assert lp == pytest.approx(float(expected[1])) and [i for i, _ in top] == [0, 1]
    assert top[0][1] == pytest.approx(float(expected[0]))


@pytest.mark.parametrize("params", [SamplingParams(temperature=float("nan")), SamplingParams(frequency_penalty=2.5),
                                    SamplingParams(presence_penalty=-3), SamplingParams(min_p=1.5),
                                    SamplingParams(logit_bias={1: 101.0}), SamplingParams(top_p=float("nan"))])
def test_out_of_range_values_are_user_errors(params):
    with pytest.raises(UserError):
        params.validate()


def test_draw_inverts_the_cdf_and_never_picks_a_zero_probability_token():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]], dtype=torch.float64)
    last_below_one = 1 - 2**-53  # u * total may round up to the total itself
    picks = [int(draw(probs, torch.tensor([u], dtype=torch.float64))[0]) for u in (0.0, 0.49, 0.5, 0.99, last_below_one, 1.0)]
    assert picks == [1, 1, 3, 3, 3, 3]


def test_draw_follows_the_distribution():
    probs = torch.tensor([0.1, 0.0, 0.6, 0.3], dtype=torch.float64)
    n = 40_000
    uniform = torch.rand(n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(draw(probs.expand(n, -1), uniform), minlength=4).double() / n
    assert counts[1] == 0
    assert torch.allclose(counts, probs, atol=4 * (0.25 / n) ** 0.5)  # 4 standard deviations at worst


def test_an_infinite_logit_is_an_error_not_a_token():
    logits = torch.tensor([0.0, float("inf"), 1.0])
    with pytest.raises(ValueError, match="infinite logit"):
        sample_next(logits, SamplingParams(temperature=0.7), torch.Generator().manual_seed(0))
