"""eval.tasks: task suites scored during training (train/evaluation.py, posttrain/eval_suites.py) give exactly what
`gigafactory eval`'s functions give on the checkpoint saved at the same step; bad settings fail in one line."""

from __future__ import annotations

import json
from contextlib import contextmanager

import pytest

from gigafactory.cli.main import main
from gigafactory.config.loader import build_config
from gigafactory.errors import UserError
from gigafactory.parallel.dims import resolve_dims
from gigafactory.train.evaluation import check_task_layout
from tests.conftest import TINY_MODEL
from tests.posttrain.conftest import VERSES

ROLLING_TASK = """\
task: verse_ppl
dataset_path: json
dataset_kwargs: {data_files: {test: DOCS}, cache_dir: CACHE}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list: [{metric: word_perplexity, higher_is_better: false}, {metric: bits_per_byte, higher_is_better: false}]
"""
LIMIT = 3  # KJV held-out items (and harness documents) per eval point


def test_scores_logged_during_training_equal_eval_on_the_saved_checkpoint(tmp_path, capsys, monkeypatch):
    from gigafactory.posttrain.eval_suites import KJVSuite
    from gigafactory.posttrain.evaluate import evaluate_checkpoint
    from gigafactory.posttrain.harness import run_harness
    from gigafactory.resilience import Watchdog

    # Whether the watchdog is paused while a suite runs (they take longer than a step; it must not fire).
    depth, paused_during_suite = [0], []
    real_paused, real_run = Watchdog.paused, KJVSuite.run

    @contextmanager
    def counted_pause(self):
        with real_paused(self):
            depth[0] += 1
            try:
                yield
            finally:
                depth[0] -= 1

    monkeypatch.setattr(Watchdog, "paused", counted_pause)
    monkeypatch.setattr(KJVSuite, "run", lambda self, model: paused_during_suite.append(depth[0] > 0) or real_run(self, model))
    (tmp_path / "text.txt").write_text("\n".join(VERSES * 40))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "docs.jsonl").write_text("".join(json.dumps({"text": v}) + "\n" for v in VERSES))
    (tasks / "verse_ppl.yaml").write_text(ROLLING_TASK.replace("DOCS", str(tasks / "docs.jsonl")).replace("CACHE", str(tmp_path / "hf")))
    run = tmp_path / "run"
    model = {**TINY_MODEL, "max_seq_len": 256}  # room for the KJV prompts
    flags = {**{f"model.{k}": v for k, v in model.items()},
             "data.inputs": str(tmp_path / "text.txt"), "data.cache_dir": str(tmp_path / "cache"), "data.seq_len": 64,
             "data.val_fraction": 0.2, "training.batch_size": 2, "training.steps": 2, "training.eval_every": 2,
             "training.eval_batches": 1, "training.dtype": "fp32", "checkpoint.every": 0, "logging.run_dir": str(run),
             "logging.tensorboard": False, "logging.progress": False,
             "eval.tasks": "kjv,harness:verse_ppl", "eval.limit": LIMIT, "eval.exact_match": True, "eval.harness_include": str(tasks)}
    assert main(["train", *(f"--{k}={v}" for k, v in flags.items())]) == 0
    printed = capsys.readouterr().out
    logged = {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "eval_loss" in r}
    assert sorted(logged) == [0, 2]  # step 0's eval point and the last step's
    assert paused_during_suite == [True, True]

    # `gigafactory eval --limit L --pref-limit L` (its functions) on the checkpoint saved at step 2, the last eval
    # point's weights: the whole KJV section, exact match and per-item scores included, and the harness task's.
    evaluated = evaluate_checkpoint(str(run), limit=LIMIT, ppl_batches=1, pref_limit=LIMIT)
    assert evaluated["checkpoint"].endswith("step-00000002")
    kjv = evaluated["kjv_task"]
    assert all(p and p["pairs"] > 0 for p in kjv["preference"].values())  # pairs fit the context: real preference scores
    harness = run_harness(evaluated["checkpoint"], ["verse_ppl"], str(tasks), LIMIT)["results"]["verse_ppl"]
    report = json.loads((run / "eval-step-2.json").read_text())
    assert report["kjv_task"] == json.loads(json.dumps(kjv))  # bit for bit: the same weights, the same forwards
    assert report["harness"]["verse_ppl"] == {k: v for k, v in harness.items() if isinstance(v, (int, float))}
    expected = {"eval/kjv/answer_loglik": kjv["answer_logp_per_token"], "eval/kjv/answer_token_acc": kjv["answer_token_accuracy"],
                "eval/kjv/exact_match": kjv["exact_match"],
                **{f"eval/kjv/preference_acc_{s}": kjv["preference"][s]["preference_accuracy"] for s in ("near", "far")},
                **{f"eval/kjv/preference_margin_{s}": kjv["preference"][s]["preference_margin"] for s in ("near", "far")},
                "eval/harness:verse_ppl/word_perplexity": harness["word_perplexity,none"],
                "eval/harness:verse_ppl/bits_per_byte": harness["bits_per_byte,none"]}
    assert {k: logged[2][k] for k in expected} == expected
    changed = [k for k in expected if "margin" in k or "loglik" in k or "harness" in k]
    assert all(logged[0][k] != logged[2][k] for k in changed)  # step 0 scored the weights before training

    # The JSON + table for each eval point; the summary lines printed at the end.
    assert report["eval_loss"] == logged[2]["eval_loss"] and (run / "eval-step-0.json").is_file()
    assert "| KJV answer log-likelihood per token |" in (run / "eval-step-2.md").read_text()
    first, last = logged[0]["eval/kjv/answer_loglik"], logged[2]["eval/kjv/answer_loglik"]
    assert f"eval/kjv/answer_loglik: {first:.4f} at step 0 -> {last:.4f} at step 2" in printed


def test_an_unknown_suite_is_one_line_naming_the_known_ones(capsys):
    assert main(["train", "--eval.tasks", "kjv,mmlu", "--print-config"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown suite 'mmlu'" in err and "known suites: kjv, harness:<task>" in err
    with pytest.raises(UserError, match="training.eval_every > 0"):
        build_config({}, {"eval.tasks": ["kjv"], "training.eval_every": 0})


@pytest.mark.parametrize("axis", ["tp", "pp", "cp"])
def test_layouts_the_suites_cannot_run_under_are_refused_up_front(axis):
    cfg = build_config({}, {"eval.tasks": ["kjv"], f"parallel.{axis}": 2, "parallel.sequence_parallel": False})
    with pytest.raises(UserError, match=f"eval.tasks with parallel.{axis}=2 is not supported yet"):
        check_task_layout(cfg, resolve_dims(cfg, 2))
    fsdp = build_config({}, {"eval.tasks": ["kjv"]})
    check_task_layout(fsdp, resolve_dims(fsdp, 2))  # FSDP (dp_shard=2) runs them


def test_sft_runs_the_suites_too(pretrained, tmp_path):
    """`gigafactory sft` (and `dpo`, through the same cli.train.train_and_report) hands its trainer the suites: the step-1
    scores are eval's on the step-1 checkpoint."""
    from gigafactory.data.chat import ChatTemplate
    from gigafactory.data.tokenizer import plain_text_encoder
    from gigafactory.inference.generate import load_for_inference
    from gigafactory.posttrain.task_metrics import answer_scores
    from gigafactory.posttrain.tasks import build_task

    run = tmp_path / "sft"
    assert main(["sft", "--checkpoint", str(pretrained / "pre"), "--data", str(pretrained / "chat.jsonl"), f"--logging.run_dir={run}",
                 "--training.steps=1", "--training.eval_every=1", "--training.eval_batches=1", "--training.batch_size=2",
                 "--eval.tasks=kjv", "--eval.limit=3"]) == 0
    report = json.loads((run / "eval-step-1.json").read_text())
    loaded = load_for_inference(run)
    expected = answer_scores(loaded.model, ChatTemplate(loaded.tokenizer, plain_text_encoder(loaded.tokenizer)), build_task()["test"][:3])
    assert {k: report["kjv_task"][k] for k in expected} == expected
