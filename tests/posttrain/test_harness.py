"""The lm-evaluation-harness LM interface against direct computations on the tiny pre-trained model."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from gigafactory.data.tokenizer import EOS_ID
from gigafactory.posttrain.harness import GrokLM


def req(*args):
    return SimpleNamespace(args=args)


@pytest.fixture(scope="module")
def lm(pretrained):
    return GrokLM(str(pretrained / "pre"), max_gen_toks=12)


def test_loglikelihood_and_rolling_equal_the_model_loss(lm):
    text = "And God said, Let there be light: and there was light."
    ids = [EOS_ID] + lm._encode(text)
    with torch.no_grad():
        loss = lm.model(torch.tensor([ids[:-1]]), targets_BS=torch.tensor([ids[1:]]))
    full = -float(loss) * (len(ids) - 1)
    (rolling,) = lm.loglikelihood_rolling([req(text)])
    assert rolling == pytest.approx(full, abs=1e-3)
    (whole, _), (tail, _) = lm.loglikelihood([req("", text), req("And God said,", " Let there be light: and there was light.")])
    assert whole == pytest.approx(full, abs=1e-3)
    assert tail < 0 and tail > whole  # a suffix is likelier than the whole string


def test_rolling_windows_cover_text_longer_than_the_context(lm):
    long = " ".join(["In the beginning God created the heaven and the earth."] * 60)
    n = len(lm._encode(long))
    assert n > lm.max_length
    (total,) = lm.loglikelihood_rolling([req(long)])
    assert total < 0 and total / n > -20  # every token scored once, none dropped


def test_greedy_flag_and_generate_until_stop(lm):
    context, cont = "And God said,", " Let there be light"
    ctx_ids, cont_ids = lm._continuation(context, cont)
    with torch.no_grad():
        logits = lm.model(torch.tensor([ctx_ids + cont_ids[:-1]]))[0, -len(cont_ids):]
    (_, is_greedy), = lm.loglikelihood([req(context, cont)])
    assert is_greedy == bool((logits.argmax(-1) == torch.tensor(cont_ids)).all())
    (text,) = lm.generate_until([req(context, {"until": [], "max_gen_toks": 6})])
    assert text
    stop = text[len(text) // 2:]
    (cut,) = lm.generate_until([req(context, {"until": [stop], "max_gen_toks": 6})])
    assert stop not in cut and text.startswith(cut)


def test_is_the_harness_lm_when_lm_eval_is_installed(lm):
    api = pytest.importorskip("lm_eval.api.model")
    assert isinstance(lm, api.LM)
