"""`plan --layout` / a TOML [parallel] table: exactly that layout is priced, next to the search's best, or one line says why not."""

import json

import pytest

from gigafactory.errors import UserError

BASE = ["--model", "grok-1b-moe", "--gpu", "h100", "--tokens", "1e10", "--batch-tokens", "1048576"]


def test_given_layout_is_priced_exactly_and_compared_with_the_search(run_plan):
    code, out = run_plan(*BASE, "--layout", "tp=2,pp=4,dp=8,ep=4", "--microbatch", "1", "--schedule", "1f1b",
                         "--zero", "1", "--json")
    given, found = json.loads(out)
    lay = given["layout"]
    assert code == 0 and given["gpus"] == 64 and given["gpus_used"] == 64
    assert (lay["tp"], lay["pp"], lay["dp_shard"], lay["dp_replicate"], lay["ep"], lay["zero"], lay["schedule"]) == (2, 4, 8, 1, 4, 1, "1f1b")
    assert lay["microbatches"] == 1048576 // 4096 // 8  # as many microbatches as reach the target batch
    assert found["step_time_s"] / found["tokens_per_step"] <= given["step_time_s"] / given["tokens_per_step"] * (1 + 1e-9)
    d = given["given_vs_search"]
    assert d["speedup_per_token"] >= 1 - 1e-9 and d["fields_changed"] == len(d["changed"])
    assert given["step_breakdown_s"]["pp_bubble"] > 0


def test_given_layout_table_names_the_distance(run_plan):
    code, out = run_plan(*BASE, "--layout", "tp=2,pp=4,dp=8,ep=4", "--schedule", "zero_bubble")
    assert code == 0 and "given layout" in out and "search's best" in out and "as fast per token" in out


def test_parallel_table_in_the_model_toml_is_priced(run_plan, tmp_path):
    f = tmp_path / "job.toml"
    f.write_text('[model]\npreset = "grok-1b-moe"\n[parallel]\ntp = 2\npp = 2\nep = 2\ndp_shard = -1\nschedule = "1f1b"\n'
                 'microbatches = 8\n[training]\nbatch_size = 2\n')
    code, out = run_plan("--model", str(f), "--gpus", "64", "--gpu", "h100", "--tokens", "1e10", "--json")
    lay = json.loads(out)[0]["layout"]
    # the trainer's mesh: dp_shard(-1 -> 8) x ep 2 x tp 2 x pp 2 = 64; the planner's dp_shard includes ep's ranks
    assert (lay["tp"], lay["pp"], lay["ep"], lay["dp_shard"], lay["microbatches"], lay["microbatch_size"]) == (2, 2, 2, 16, 8, 2)


@pytest.mark.parametrize("argv, needle", [
    (["--layout", "tp=3,dp=8"], "tp=3 does not divide"),
    (["--layout", "tp=2,dp=8,ep=3"], "ep=3 does not divide"),
    (["--layout", "tp=2,pq=4"], "is not KEY=N"),
    (["--layout", "tp=2,pp=4,dp=8", "--stage-layers", "4+4+4+5"], "add up to the model's 16 layers"),
    (["--layout", "pp=4,dp=2", "--schedule", "interleaved_1f1b", "--microbatches", "6"], "multiple of pp"),
    (["--layout", "pp=4,dp=2", "--schedule", "dualpipe", "--microbatches", "2"], "dualpipe needs"),
    (["--layout", "dp=8", "--gpus", "32,64"], "one --gpus count"),
    (["--layout", "tp=8,dp=64", "--gpus", "64"], "needs 512 GPUs"),
    (["--gpu", "a100-80gb", "--gpus", "64", "--precision", "fp8"], "no fp8 tensor cores"),
    (["--layout", ""], "--layout is empty"),
    (["--gpus", "1e30"], "more than the 10,000,000 GPUs"),
    (["--gpus", "inf"], "must be comma-separated integers"),
    (["--gpus", "64", "--failures-per-gpu-day", "1e300"], "leave no time to train"),  # was an OverflowError  # not a silent fall back to the search alone
    (["--layout", "tp=2,tp=4"], "tp is given twice"),
    (["--layout", "tp=" + "9" * 5000], "not a whole number below 10^9"),  # and the 5000 digits are not echoed
    (["--layout", "tp=\u00b2"], "not a whole number"),
    (["--layout", "tp=2", "--stage-layers", "1+\u00b2"], "--stage-layers"),
])
def test_impossible_layouts_are_one_line(run_plan, argv, needle):
    with pytest.raises(UserError) as err:
        run_plan(*BASE, *argv)
    assert needle in str(err.value) and "\n" not in str(err.value) and len(str(err.value)) < 400


def test_a_layout_that_does_not_fit_says_where_and_why(run_plan):
    with pytest.raises(UserError) as err:
        run_plan("--model", "grok-1", "--gpu", "h100", "--layout", "tp=1,dp=8", "--zero", "0")
    msg = str(err.value)
    assert "does not fit" in msg and "GiB on pipeline stage 0" in msg and "states" in msg and "\n" not in msg


@pytest.mark.parametrize("model_table, needle", [
    ("model = 3\n", "must be a table"),
    ('[model]\npreset = "grok-1b-moe"\nattention = "mla"\nkv_lora_rank = nan\n', "kv_lora_rank = nan must be a whole number"),
    ('[model]\npreset = "grok-1b-moe"\nn_shared_experts = 1e300\n', "n_shared_experts = 1e+300 must be a whole number"),
])
def test_bad_planner_model_keys_are_one_line(run_plan, tmp_path, model_table, needle):
    f = tmp_path / "m.toml"
    f.write_text(model_table)
    with pytest.raises(UserError) as err:
        run_plan("--model", str(f), "--gpus", "64")
    assert needle in str(err.value) and "\n" not in str(err.value)
