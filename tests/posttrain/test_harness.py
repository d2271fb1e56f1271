"""The lm-evaluation-harness LM interface against direct computations on the tiny pre-trained model."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from gigafactory.cli.main import main
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


TASKS = """\
task: kjv_choice
dataset_path: json
dataset_kwargs: {data_files: {test: DOCS}, cache_dir: CACHE}
test_split: test
output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{gold}}"
target_delimiter: ""
metric_list: [{metric: acc, aggregation: mean, higher_is_better: true}]
---
task: kjv_rolling
dataset_path: json
dataset_kwargs: {data_files: {test: DOCS}, cache_dir: CACHE}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list: [{metric: word_perplexity, higher_is_better: false}]
---
task: kjv_generate
dataset_path: json
dataset_kwargs: {data_files: {test: DOCS}, cache_dir: CACHE}
test_split: test
output_type: generate_until
doc_to_text: "{{question}}"
doc_to_target: "{{choices[gold]}}"
generation_kwargs: {until: ["\\n"], max_gen_toks: 4}
metric_list: [{metric: exact_match, aggregation: mean, higher_is_better: true}]
"""
DOCS = [{"question": "In the beginning God created the heaven and the", "choices": [" earth.", " sea.", " night."], "gold": 0,
         "text": "And God said, Let there be light: and there was light."},
        {"question": "The LORD is my", "choices": [" king", " shepherd"], "gold": 1, "text": "Jesus wept."}]


def test_lm_eval_runs_local_tasks_of_every_request_type_on_our_model(lm, pretrained, tmp_path):
    """`gigafactory eval --harness-tasks` on local task files (no download): multiple choice (loglikelihood),
    rolling perplexity and generation all run through GrokLM, and each metric is what our interface's own answers
    give."""
    import math

    from lm_eval.api.model import LM

    assert isinstance(lm, LM)
    docs = tmp_path / "tasks" / "docs.jsonl"
    docs.parent.mkdir()
    docs.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    for k, text in enumerate(TASKS.split("---\n")):
        (docs.parent / f"task{k}.yaml").write_text(text.replace("DOCS", str(docs)).replace("CACHE", str(tmp_path / "hf")))
    out = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(pretrained / "pre"), "--limit", "1", "--pref-limit", "1", "--ppl-batches", "1", "--out", str(out),
                 "--harness-tasks", "kjv_choice,kjv_rolling,kjv_generate", "--harness-include", str(docs.parent)]) == 0
    results = json.loads(out.read_text())["harness"]
    scores = [[ll for ll, _ in lm.loglikelihood([req(d["question"], c) for c in d["choices"]])] for d in DOCS]
    assert results["kjv_choice"]["acc,none"] == pytest.approx(sum(s.index(max(s)) == d["gold"] for s, d in zip(scores, DOCS)) / 2)
    rolling = lm.loglikelihood_rolling([req(d["text"]) for d in DOCS])
    words = sum(len(d["text"].split()) for d in DOCS)
    assert results["kjv_rolling"]["word_perplexity,none"] == pytest.approx(math.exp(-sum(rolling) / words), rel=1e-5)
    generated = lm.generate_until([req(d["question"], {"until": ["\n"], "max_gen_toks": 4}) for d in DOCS])
    expect = sum(g.strip() == d["choices"][d["gold"]].strip() for g, d in zip(generated, DOCS)) / 2
    assert results["kjv_generate"]["exact_match,none"] == pytest.approx(expect)
