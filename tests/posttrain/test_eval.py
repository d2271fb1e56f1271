"""The KJV instruction task (split by sentence, exact match) and `gigafactory eval`."""

from __future__ import annotations

import json
import re

from gigafactory.cli.main import main
from gigafactory.posttrain.tasks import build_task, exact_match

QUOTED = re.compile(r'"(.*)"')


def test_task_split_never_shows_a_test_sentence_in_training():
    task = build_task()
    assert len(task["train"]) == 4000 and len(task["test"]) == 200
    def sentences(item):  # what an item shows: its quoted sentence and, for "continue", the answer
        shown = {QUOTED.search(item["messages"][0]["content"]).group(1)}
        return shown | ({item["answer"]} if item["kind"] == "continue" else set())
    train = set().union(*(sentences(i) for i in task["train"]))
    test = set().union(*(sentences(i) for i in task["test"]))
    assert not train & test
    assert {i["kind"] for i in task["test"]} == {"reference", "continue"}
    assert build_task() == task  # deterministic: the same items on every machine


def test_exact_match_is_exact_up_to_whitespace():
    assert exact_match("  Genesis 1\n", "Genesis 1")
    assert not exact_match("Genesis 1.", "Genesis 1") and not exact_match("genesis 1", "Genesis 1")


def test_eval_cli_writes_json_and_table(pretrained, tmp_path, capsys):
    out = tmp_path / "eval.json"
    train_pairs = tmp_path / "dpo-pairs.jsonl"  # in-sample preference accuracy: a DPO run's own pairs
    train_pairs.write_text("".join(json.dumps({"prompt": f'Which book and chapter says "{v}"?', "chosen": "John 11", "rejected": "John 12"}) + "\n"
                                   for v in ("Jesus wept.", "For God so loved the world.", "Let there be light.")))
    assert main(["eval", "--checkpoint", str(pretrained / "pre"), "--limit", "6", "--pref-limit", "8", "--ppl-batches", "2",
                 "--pref-data", str(train_pairs), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    h, t = result["heldout"], result["kjv_task"]
    assert h["perplexity"] > 1 and abs(h["perplexity"] - 2.718281828 ** h["loss"]) < 1e-6 * h["perplexity"]
    assert t["items"] == 6 and 0 <= t["exact_match"] <= 1 and t["answer_loss"] > 0
    assert "| held-out perplexity |" in printed and out.with_suffix(".md").is_file()
    assert len(t["per_item"]) == 6 and len({key for key, _, _ in t["per_item"]}) == 6  # exact match per item, for --compare
    for style in ("near", "far"):  # preferences sized apart from exact match: --pref-limit held-out items
        p = t["preference"][style]
        assert p["rejected"] == style and p["pairs"] + p["too_long"] == 8 and len(p["per_pair"]) == p["pairs"]
        assert f"{style} misses ({p['pairs']} held-out pairs)" in printed
    own = t["preference"]["file:dpo-pairs.jsonl"]
    assert own["pairs"] == 3 and own["by_kind"]["reference"]["pairs"] == 3 and "pairs of dpo-pairs.jsonl (3)" in printed


def test_write_task_gives_chat_files_sft_reads(tmp_path):
    from gigafactory.data.preference import read_preference_jsonl
    from gigafactory.data.sft import read_chat_jsonl

    assert main(["eval", "--write-task", str(tmp_path)]) == 0
    assert len(read_chat_jsonl(tmp_path / "kjv-train.jsonl")) == 4000
    pairs = read_preference_jsonl(tmp_path / "kjv-pairs.jsonl")  # DPO: the answer against a near miss
    assert len(pairs) == 4000 and all(p["chosen"] != p["rejected"] for p in pairs)
    far = read_preference_jsonl(tmp_path / "kjv-pairs-far.jsonl")  # the same prompts and answers against far misses
    assert [(p["messages"], p["chosen"]) for p in far] == [(p["messages"], p["chosen"]) for p in pairs]
    assert all(p["chosen"] != p["rejected"] for p in far)
