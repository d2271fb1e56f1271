"""The cost model's mechanisms, each against the property that defines it (pipeline, ZeRO, MoE, fp8, FLOP conventions)."""

import dataclasses

import pytest

from gigafactory.models.presets import get_preset
from gigafactory.plan import comm
from gigafactory.plan.cost import estimate
from gigafactory.plan.hardware import make_cluster
from gigafactory.plan.layout import MODERN, Layout
from gigafactory.plan.memory import estimate_memory
from gigafactory.plan.pipeline import StageTimes, balanced_stages, pipeline_time
from gigafactory.plan.workload import from_model_config

GROK1 = from_model_config(get_preset("grok-1"))
SMALL = from_model_config(get_preset("grok-1b-moe"))


def _stages(p: int, f: float = 1.0, b: float = 2.0, w: float = 1.0) -> StageTimes:
    return StageTimes((f,) * p, (b,) * p, (w,) * p)


def test_bubble_depends_on_microbatches_and_one_microbatch_is_never_bubble_free():
    p = 8
    for sched in ("1f1b", "zero_bubble"):
        per_mb = [pipeline_time(Layout(pp=p, microbatches=m, schedule=sched), _stages(p)) / m for m in (1, 2, 8, 64)]
        assert all(a > b for a, b in zip(per_mb, per_mb[1:]))  # the bubble is amortised over more microbatches
    one = pipeline_time(Layout(pp=p, microbatches=1, schedule="zero_bubble"), _stages(p))
    assert one > 3.0 * 1.5  # far from one stage's 3 s: the microbatch still crosses all stages
    # ZB-H1 with m >= p: bubble (p-1)(F+B-2W) = 7 * 1 s; 1F1B's is (p-1)(F+B) = 21 s
    assert pipeline_time(Layout(pp=p, microbatches=16, schedule="zero_bubble"), _stages(p)) == pytest.approx(16 * 3 + 7 * 1)
    assert pipeline_time(Layout(pp=p, microbatches=16, schedule="1f1b"), _stages(p)) == pytest.approx(16 * 3 + 7 * 3)
    # DualPipe: (p/2 - 1)(F + 2B - 3W) = 3 * 2 s
    assert pipeline_time(Layout(pp=p, microbatches=16, schedule="dualpipe"), _stages(p)) == pytest.approx(16 * 3 + 3 * 2)


def test_uneven_stages_give_the_head_stage_fewer_layers_and_are_never_slower():
    stages = balanced_stages(126, 16, 1.0, 2.0)
    assert sum(stages) == 126 and stages[-1] < max(stages) and stages[0] <= stages[1]
    w = dataclasses.replace(GROK1, vocab=1_048_576)  # a huge head makes the last stage the bottleneck
    cluster = make_cluster("h100", 1024)
    lay = Layout(dp_shard=16, tp=8, pp=8, ep=8, microbatches=32, schedule="1f1b", zero=3)
    auto = estimate(w, lay, cluster, MODERN, 8192)
    even = estimate(w, dataclasses.replace(lay, stage_layers=(8,) * 8), cluster, MODERN, 8192)
    assert auto.stage_layers != (8,) * 8 and auto.step_time_s < even.step_time_s


def test_zero_stages_trade_memory_for_traffic():
    cluster = make_cluster("h100", 512)
    base = Layout(dp_shard=64, tp=8, ep=8, microbatches=4)
    mems = [estimate_memory(GROK1, dataclasses.replace(base, zero=z), MODERN, 8192).states for z in (1, 2, 3)]
    assert mems[0] > mems[1] > mems[2]
    ddp = estimate_memory(GROK1, dataclasses.replace(base, dp_shard=1, dp_replicate=64), MODERN, 8192).states
    assert ddp > mems[0]
    # ZeRO-3 gathers weights every microbatch; ZeRO-1 once per step: more microbatches cost ZeRO-3 more traffic
    z3 = [estimate(GROK1, dataclasses.replace(base, zero=3, microbatches=m), cluster, MODERN, 8192).breakdown["zero_comm"] for m in (4, 16)]
    z1 = [estimate(GROK1, dataclasses.replace(base, zero=1, microbatches=m), cluster, MODERN, 8192).breakdown["zero_comm"] for m in (4, 16)]
    assert z1 == [0.0, 0.0] and z3[1] >= 4 * z3[0] * (1 - 1e-9)


def test_bf16_gradient_reduction_halves_the_sync_it_exposes():
    cluster = make_cluster("h100", 4096)
    lay = Layout(dp_replicate=512, tp=8, microbatches=1, zero=0)
    w = from_model_config(get_preset("grok-20b-moe"))
    fp32 = estimate(w, lay, cluster, MODERN, 4096).breakdown["dp_comm"]
    bf16 = estimate(w, dataclasses.replace(lay, reduce_dtype="bf16"), cluster, MODERN, 4096).breakdown["dp_comm"]
    assert fp32 > 0 and bf16 < fp32


def test_node_limited_routing_sends_less_over_the_network():
    cluster = make_cluster("h800", 2048)
    plain = comm.moe_all_to_all(1e8, 8, 64, 1, cluster)
    limited = comm.moe_all_to_all(1e8, 8, 64, 1, cluster, node_limit=4)
    assert limited < plain
    assert comm.moe_all_to_all(1e8, 8, 8, 1, cluster, 4) == comm.moe_all_to_all(1e8, 8, 8, 1, cluster)  # one node


def test_dualpipe_hides_expert_all_to_all_that_1f1b_exposes():
    cluster = make_cluster("h100", 1024)
    lay = Layout(dp_shard=64, pp=16, ep=64, microbatches=32, zero=1)
    one = estimate(SMALL, dataclasses.replace(lay, schedule="1f1b"), cluster, MODERN, 4096).breakdown["ep_comm"]
    dual = estimate(SMALL, dataclasses.replace(lay, schedule="dualpipe"), cluster, MODERN, 4096).breakdown["ep_comm"]
    assert one > 0 and dual < one


def test_fp8_is_faster_but_less_than_twice_and_mfu_names_its_convention():
    cluster = make_cluster("h100", 512)
    lay = Layout(dp_shard=64, tp=8, ep=8, microbatches=4, zero=1)
    bf16 = estimate(GROK1, lay, cluster, MODERN, 8192)
    fp8 = estimate(GROK1, dataclasses.replace(lay, precision="fp8"), cluster, MODERN, 8192)
    assert bf16.step_time_s / 2 < fp8.step_time_s < bf16.step_time_s
    assert fp8.mfu > bf16.mfu  # same model FLOPs over the bf16 peak
    assert bf16.mfu_causal < bf16.mfu
    a, b = GROK1.attention_flops_per_token(8192), GROK1.attention_flops_per_token(8192, causal=True)
    assert b == a / 2


def test_shared_experts_and_dense_layers_and_mla_are_described():
    from gigafactory.plan.validation import CASES, workload

    ds = workload(next(c for c in CASES if "DeepSeek" in c.name))
    assert ds.attention == "mla" and ds.n_shared_experts == 1 and ds.n_moe_layers == 58
    assert ds.params_total == pytest.approx(671e9, rel=0.01)  # DeepSeek-V3: 671B total
    active = ds.forward_matmul_flops_per_token() / 2 + ds.vocab * ds.d_model
    assert active == pytest.approx(37e9, rel=0.03)  # ... and 37B activated per token


def test_plain_mlp_and_mla_keys_in_a_model_toml(run_plan, tmp_path):
    import json

    f = tmp_path / "m.toml"
    f.write_text('[model]\npreset = "grok-1b-moe"\nmlp = "plain"\nattention = "mla"\nkv_lora_rank = 256\nrope_head_dim = 32\n')
    code, out = run_plan("--model", str(f), "--gpus", "64", "--gpu", "h100", "--tokens", "1e10", "--json")
    assert code == 0 and json.loads(out)[0]["mfu"] > 0
    f.write_text('[model]\npreset = "grok-1b-moe"\nmlp = "swiglu"\n')
    from gigafactory.errors import UserError

    with pytest.raises(UserError, match="must be 'gated' or 'plain'"):
        run_plan("--model", str(f), "--gpus", "64")
