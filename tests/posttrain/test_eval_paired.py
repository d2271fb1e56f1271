"""Held-out preference pairs (near and far misses), per-item scores and `gigafactory eval --compare`'s paired statistics."""

from __future__ import annotations

import json
import re
from math import comb

import numpy as np
import pytest

from gigafactory.cli.main import main
from gigafactory.errors import UserError
from gigafactory.posttrain.paired import bootstrap_ci, compare_results, mcnemar_exact_p, paired_accuracy
from gigafactory.posttrain.tasks import book_of, build_task, preference_pairs, same_shape

QUOTED = re.compile(r'"(.*)"')


def test_far_misses_are_another_books_answer_from_the_same_split():
    task = build_task(max_test=10**9)
    def shown(items):  # the sentences items show: quoted in the question, or the answer of a "continue" item
        return {QUOTED.search(i["messages"][0]["content"]).group(1) for i in items} | {i["answer"] for i in items if i["kind"] == "continue"}
    test_sentences = shown(task["test"])
    for split, items in (("train", build_task()["train"]), ("test", task["test"])):
        pairs = preference_pairs(items, rejected="far")
        answers = {i["answer"] for i in items}
        for item, pair in zip(items, pairs):
            assert pair["chosen"] == item["answer"] and pair["rejected"] in answers  # a real answer of this split
            if item["kind"] == "reference":
                assert book_of({"kind": "reference", "answer": pair["rejected"]}) != book_of(item)
        assert sum(same_shape(p["chosen"], p["rejected"]) for p in pairs) > 0.95 * len(pairs)
        if split == "train":  # no held-out sentence reaches a training pair, as chosen or as rejected
            assert not {p["rejected"] for p in pairs} & test_sentences and not shown(items) & test_sentences
    assert len(task["test"]) > 1000  # the whole held-out split: the preference set `eval` scores by default
    assert preference_pairs(task["test"], rejected="far") == preference_pairs(task["test"], rejected="far")
    with pytest.raises(UserError, match="rejected-answer construction"):
        preference_pairs(task["test"], rejected="nearest")


def test_mcnemar_exact_p_is_the_two_sided_binomial_tail():
    assert mcnemar_exact_p(0, 0) == 1.0
    assert mcnemar_exact_p(0, 6) == pytest.approx(2 / 64)
    assert mcnemar_exact_p(3, 3) == 1.0
    n, k = 2000, 940  # large counts stay exact (no float underflow in comb / 2**n)
    assert mcnemar_exact_p(k, n - k) == pytest.approx(2 * sum(comb(n, i) for i in range(k + 1)) / 2**n, rel=1e-12)
    assert 0.005 < mcnemar_exact_p(k, n - k) < 0.01


def test_paired_test_finds_a_difference_independent_samples_would_miss():
    rng = np.random.default_rng(1)
    easy = rng.random(1000) < 0.5  # item difficulty shared by both checkpoints
    a = {f"k{i}": bool(e) for i, e in enumerate(easy)}
    b = dict(a)
    for i in np.flatnonzero(~easy)[:40]:  # B gets 40 more items right, loses none: +0.04
        b[f"k{i}"] = True
    c = paired_accuracy(a, b)
    assert c["items"] == 1000 and c["difference"] == pytest.approx(0.04)
    assert c["b_right_a_wrong"] == 40 and c["a_right_b_wrong"] == 0 and c["mcnemar_p"] < 1e-10
    lo, hi = c["ci95"]
    assert 0 < lo < 0.04 < hi  # an unpaired 95% interval would be about +-0.044 and include 0
    lo0, hi0 = bootstrap_ci(rng.normal(0, 1, 4000))
    assert lo0 < 0 < hi0 and hi0 - lo0 == pytest.approx(2 * 1.96 / 4000**0.5, rel=0.1)
    with pytest.raises(UserError, match="share no items"):
        paired_accuracy({"x": True}, {"y": True})


def _result(name: str, margins: dict[str, float], hits: dict[str, bool]) -> dict:
    per_pair = [[k, "reference", m] for k, m in margins.items()]
    return {"checkpoint": name, "kjv_task": {"preference": {"near": {"per_pair": per_pair}},
                                             "per_item": [[k, "reference", h] for k, h in hits.items()]}}


def test_eval_compare_prints_and_stores_paired_statistics(tmp_path, capsys):
    keys = [f"k{i}" for i in range(50)]
    a = _result("A", {k: -1.0 if i < 30 else 1.0 for i, k in enumerate(keys)}, {k: False for k in keys})
    b = _result("B", {k: 1.0 for k in keys[5:]} | {"extra": 1.0}, {k: i < 3 for i, k in enumerate(keys)})
    for r, hit in ((a, False), (b, True)):  # an item the task holds twice: its copies pair up, not collapse
        r["kjv_task"]["per_item"] += [["twice", "reference", False], ["twice", "reference", hit]]
    (tmp_path / "a.json").write_text(json.dumps(a)), (tmp_path / "b.json").write_text(json.dumps(b))
    assert main(["eval", "--compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out", str(tmp_path / "c.json")]) == 0
    printed = capsys.readouterr().out
    stored = json.loads((tmp_path / "c.json").read_text())
    assert stored == json.loads(json.dumps(compare_results(a, b)))
    near = stored["preference"]["near"]["all"]
    assert near["items"] == 45 and near["accuracy_a"] == pytest.approx(20 / 45) and near["accuracy_b"] == 1.0
    assert near["b_right_a_wrong"] == 25 and near["mcnemar_p"] == pytest.approx(2 / 2**25)
    assert near["margin_difference"] == pytest.approx(50 / 45)
    assert stored["exact_match"]["items"] == 52 and stored["exact_match"]["b_right_a_wrong"] == 4
    assert stored["exact_match"]["mcnemar_p"] == pytest.approx(0.125)
    assert "| preference (near) | 45 |" in printed and "| exact match | 52 |" in printed
    (tmp_path / "old.json").write_text(json.dumps({"checkpoint": "old", "kjv_task": {"preference": {"preference_accuracy": 0.5}}}))
    assert main(["eval", "--compare", str(tmp_path / "old.json"), str(tmp_path / "a.json")]) == 2  # one line, non-zero exit
    assert "re-run eval" in capsys.readouterr().err
