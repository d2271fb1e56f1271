"""The KJV task's continuous scores against direct computations on each item run alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gigafactory.posttrain.task_metrics import answer_scores, preference_scores
from gigafactory.posttrain.tasks import preference_pairs
from tests.posttrain.test_sft_masks import template, tiny_model  # noqa: F401 - a fixture and a helper

ITEMS = [{"kind": kind, "answer": answer, "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": answer}]}
         for kind, q, answer in [("continue", "Quote what follows in John 11", "Jesus wept."),
                                 ("reference", 'Which book and chapter says "Jesus wept."?', "John 11"),
                                 ("continue", "Quote Genesis 1", "And God said, Let there be light: and there was light.")]]


def reply_logps(model, template, item, reply):  # noqa: F811
    """log p of each token of reply + [EOS] after the item's prompt, and whether each is the argmax."""
    prompt = template.encode(item["messages"][:-1])
    ids = torch.tensor([prompt + template.encoder.encode(reply).ids + [2]])
    logits = model(ids)[0, :-1]
    targets = ids[0, 1:]
    logp = F.log_softmax(logits, -1).gather(1, targets[:, None]).squeeze(1)[len(prompt) - 1:]
    return logp, (logits.argmax(-1) == targets)[len(prompt) - 1:]


def test_answer_and_preference_scores_equal_direct_computation(template):  # noqa: F811
    model = tiny_model(max_seq_len=128)
    with torch.no_grad():
        got = answer_scores(model, template, ITEMS)
        alone = [reply_logps(model, template, item, item["answer"]) for item in ITEMS]
        logp = torch.cat([lp for lp, _ in alone])
        assert got["answer_tokens"] == len(logp)
        assert got["answer_logp_per_token"] == pytest.approx(logp.mean().item(), abs=1e-6)
        assert got["answer_loss"] == pytest.approx(-logp.mean().item(), abs=1e-6)
        assert got["answer_token_accuracy"] == pytest.approx(torch.cat([hit for _, hit in alone]).float().mean().item())

        pref = preference_scores(model, template, ITEMS)
        margins = [reply_logps(model, template, item, pair["chosen"])[0].sum() - reply_logps(model, template, item, pair["rejected"])[0].sum()
                   for item, pair in zip(ITEMS, preference_pairs(ITEMS))]
        assert pref["pairs"] == 3 and pref["too_long"] == 0
        assert pref["preference_margin"] == pytest.approx(torch.stack(margins).mean().item(), abs=1e-5)
        assert pref["preference_accuracy"] == pytest.approx(sum(m > 0 for m in margins) / 3)
        assert [m for _, _, m in pref["per_pair"]] == pytest.approx([float(m) for m in margins], abs=5e-5)
        assert [kind for _, kind, _ in pref["per_pair"]] == [item["kind"] for item in ITEMS]
        assert pref["by_kind"]["continue"] == {"preference_accuracy": pytest.approx(float(margins[0] > 0) / 2 + float(margins[2] > 0) / 2), "pairs": 2}
