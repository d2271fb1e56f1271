"""What a careless user hands sft / dpo / eval: each mistake is one UserError line, before any work is lost."""

from __future__ import annotations

import pytest

from gigafactory.data.preference import read_preference_jsonl
from gigafactory.data.sft import read_chat_jsonl
from gigafactory.errors import UserError
from gigafactory.posttrain.lora import LoRA
from gigafactory.posttrain.options import LoRAOptions
from tests.posttrain.test_sft_masks import tiny_model

GOOD_CHAT = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ho"}]}\n'


@pytest.mark.parametrize("reader", [read_chat_jsonl, read_preference_jsonl])
def test_non_utf8_and_directory_are_one_line_naming_the_problem(tmp_path, reader):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'\n{"messages": "\xff\xfe"}\n')  # a blank line, then bytes that are not UTF-8
    with pytest.raises(UserError, match=r"bad.jsonl:2: not UTF-8"):
        reader(bad)
    with pytest.raises(UserError, match="is a directory"):
        reader(tmp_path)
    deep = tmp_path / "deep.jsonl"
    deep.write_text("[" * 100_000 + "\n")
    with pytest.raises(UserError, match="deep.jsonl:1: not a JSON object"):
        reader(deep)


def test_a_byte_order_mark_is_not_an_error(tmp_path):
    chat = tmp_path / "bom.jsonl"
    chat.write_bytes(b"\xef\xbb\xbf" + GOOD_CHAT.encode())
    assert read_chat_jsonl(chat)[0][1]["content"] == "ho"


def test_lora_rank_above_a_weights_smaller_side_is_refused_before_allocating():
    model = tiny_model()
    smallest = min(min(p.shape[-2:]) for p in model.parameters() if p.ndim >= 2)
    with pytest.raises(UserError, match=r"--lora.rank 100000 exceeds the smaller side of .* pass a rank <="):
        LoRA(model, LoRAOptions(rank=100_000))
    LoRA(tiny_model(), LoRAOptions(rank=min(smallest, 8)))  # an ordinary rank still builds


def _eval_json(**task) -> dict:
    return {"checkpoint": "run", "kjv_task": {"per_item": [["k1", "reference", True], ["k2", "continue", False]],
                                              "preference": {"near": {"per_pair": [["k1", "reference", 0.5]]}}, **task}}


@pytest.mark.parametrize("content, problem", [
    (None, "not found"),
    (b"\xff\xfe{", "no kjv_task object"),
    ('{"kjv_task": "x"}', "no kjv_task object"),
    ({"kjv_task": {"per_item": [["k1", True]]}}, "per_item must be"),
    (_eval_json(preference={"near": {"per_pair": [["k1", "reference", "high"]]}}), r"preference.near.per_pair must be"),
    (_eval_json(preference={"near": {"per_pair": [["k1", "reference", float("nan")]]}}), "finite margin"),
    (_eval_json(preference=[1]), "preference must be an object"),
])
def test_eval_compare_refuses_a_file_it_cannot_read_in_one_line(tmp_path, content, problem):
    import json

    from gigafactory.posttrain.paired import compare_results, load_result

    path = tmp_path / "a.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(UserError, match=problem):
        load_result(str(path))
    good = tmp_path / "good.json"
    good.write_text(json.dumps(_eval_json()))
    assert compare_results(load_result(str(good)), load_result(str(good)))["exact_match"]["difference"] == 0.0


@pytest.mark.parametrize("flags", [["--checkpoint", "RUN", "--out", "{tmp}"], ["--checkpoint", "RUN", "--out", "{tmp}/x.md"],
                                   ["--checkpoint", "RUN", "--out", "{file}/x.json"], ["--write-task", "{file}"]])
def test_eval_refuses_an_output_path_it_could_not_write_before_any_work(tmp_path, capsys, flags):
    """A directory, a .md (its table would overwrite it) or a path under a file: exit 2 at parsing, not a
    traceback after minutes of scoring (RUN does not exist: parsing fails before it is read)."""
    from gigafactory.cli.main import main

    (tmp_path / "f.txt").write_text("x")
    argv = ["eval", *(f.format(tmp=tmp_path, file=tmp_path / "f.txt") for f in flags)]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and ("is not a .json file path" in err or "is a file" in err or "is not a directory" in err)


def test_compare_of_results_drawn_under_other_limits_keeps_what_pairs_and_names_the_rest():
    """--pref-limit / eval.limit draw the pairs (other rejected answers, other keys): those scores cannot pair up,
    which must neither sink the exact-match comparison nor read as 'another task'."""
    from gigafactory.posttrain.paired import compare_results, comparison_table

    a = _eval_json()
    b = _eval_json(preference={"near": {"per_pair": [["other-draw", "reference", 0.5]]}})
    out = compare_results(a, b)
    assert out["exact_match"]["items"] == 2 and out["unpaired"] == ["preference (near)"]
    assert "not compared" in comparison_table(out)
    b["kjv_task"]["per_item"] = [["k9", "reference", True]]
    with pytest.raises(UserError, match="score both with the same --limit and --pref-limit"):
        compare_results(a, b)


@pytest.mark.parametrize("alpha", [float("inf"), float("nan"), 1e300, 0.0])
def test_lora_alpha_that_would_make_the_update_nan_is_refused(alpha):
    """inf (or a scale past float16's range) times the zero-initialised B is NaN: a ruined merged checkpoint."""
    with pytest.raises(UserError, match="--lora.alpha"):
        LoRAOptions(rank=4, alpha=alpha).validate()
    LoRAOptions(rank=4, alpha=32.0).validate()


def test_a_misspelt_lora_target_beside_a_valid_one_is_refused():
    with pytest.raises(UserError, match="names bogus, which this model does not have"):
        LoRA(tiny_model(), LoRAOptions(rank=2, targets="wq,bogus"))
    assert len(LoRA(tiny_model(), LoRAOptions(rank=2, targets="wq,lm_head")).targets) >= 2  # lm_head: on the last stage


def test_harness_tasks_empty_negative_limit_or_offline_data_are_one_line(tmp_path, monkeypatch):
    import lm_eval  # a test dependency (pyproject [test]): missing, this fails instead of skipping

    from gigafactory.posttrain.harness import run_harness

    with pytest.raises(UserError, match="names no task"):
        run_harness(object(), [])  # `--harness-tasks ,`: lm-eval's own ValueError traceback before
    with pytest.raises(UserError, match="--harness-limit -3 must be >= 1"):
        run_harness(object(), ["t"], limit=-3)
    (tmp_path / "t.yaml").write_text("task: hostile_t\ndataset_path: json\noutput_type: loglikelihood\n"
                                     "doc_to_text: q\ndoc_to_target: a\n")

    def offline(**kwargs):
        raise ConnectionError("Couldn't reach 'x' on the Hub")

    monkeypatch.setattr(lm_eval, "simple_evaluate", offline)
    with pytest.raises(UserError, match="could not fetch the data of hostile_t .* --harness-include"):
        run_harness(object(), ["hostile_t"], str(tmp_path))


def test_sft_and_dpo_read_the_users_config_file_between_their_defaults_and_flags(pretrained, tmp_path, capsys):
    """--config FILE was silently ignored (the base run's config.toml took its place): a typo in it said nothing."""
    from gigafactory.cli.main import main

    base = ["--checkpoint", str(pretrained / "pre"), "--data", str(pretrained / "chat.jsonl")]
    toml = tmp_path / "mine.toml"
    toml.write_text('[eval]\nlimit = 7\n[training]\nsteps = 9\neval_every = 3\n')
    assert main(["sft", *base, "--config", str(toml), "--training.steps", "4", "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "limit = 7" in printed and "steps = 4" in printed and "eval_every = 3" in printed and "lr = 0.0003" in printed
    toml.write_text("[eval]\nlimt = 7\n")
    assert main(["sft", *base, "--config", str(toml), "--print-config"]) == 2
    assert "unknown config key 'eval.limt'" in capsys.readouterr().err
