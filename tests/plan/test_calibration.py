"""Megatron-LM SC21 Table 1: the cost model on the paper's own layouts, and the search against them."""

import pytest

from gigafactory.models.presets import get_preset
from gigafactory.plan.calibration import SEQ_LEN, TABLE1
from gigafactory.plan.cost import estimate
from gigafactory.plan.forecast import days_at
from gigafactory.plan.hardware import make_cluster
from gigafactory.plan.layout import MEGATRON_SC21
from gigafactory.plan.search import SearchSpace, search
from gigafactory.plan.workload import megatron_gpt, model_flops_check


@pytest.mark.parametrize("row", TABLE1, ids=lambda r: f"{r.params_b}B")
def test_table1_within_10_percent(row):
    est = estimate(row.workload(), row.layout(), make_cluster("a100-80gb", row.gpus), MEGATRON_SC21, SEQ_LEN)
    assert est.fits, f"{row.params_b}B does not fit: {est.memory.total / 1e9:.1f} GB"
    assert est.tokens_per_step == row.batch * SEQ_LEN
    assert abs(est.tflops_per_gpu / row.tflops - 1) <= 0.10, (est.tflops_per_gpu, row.tflops)


@pytest.mark.parametrize("row", TABLE1, ids=lambda r: f"{r.params_b}B")
def test_search_at_least_as_fast_as_paper(row):
    cluster = make_cluster("a100-80gb", row.gpus)
    paper = estimate(row.workload(), row.layout(), cluster, MEGATRON_SC21, SEQ_LEN)
    space = SearchSpace(global_batch=row.batch, batch_slack=0.0, max_idle=0.0, sequence_parallel=False)
    best, _ = search(row.workload(), cluster, MEGATRON_SC21, SEQ_LEN, space)
    per_token = best[0].step_time_s / best[0].tokens_per_step
    assert per_token <= paper.step_time_s / paper.tokens_per_step * (1 + 1e-9)
    assert best[0].fits


def test_paper_flops_formula():
    """Executed FLOPs per token = 96 l h^2 (1 + s/6h + V/16lh), the paper's count with recompute."""
    row = TABLE1[4]
    w = megatron_gpt(row.hidden, row.layers, row.heads)
    est = estimate(w, row.layout(), make_cluster("a100-80gb", row.gpus), MEGATRON_SC21, SEQ_LEN)
    h, l, s, v = row.hidden, row.layers, SEQ_LEN, 51200
    paper = 96 * l * h * h * (1 + s / (6 * h) + v / (16 * l * h))
    executed = est.tflops_per_gpu * 1e12 * est.step_time_s * row.gpus / est.tokens_per_step
    assert executed == pytest.approx(paper, rel=1e-9)


def test_paper_worked_examples():
    assert days_at(140, 175e9, 300e9, 1024) == pytest.approx(34, abs=1)
    assert days_at(163, 1e12, 450e9, 3072) == pytest.approx(84, abs=1)


@pytest.mark.parametrize("name", ["grok-1", "grok-2", "grok-tiny", "mixtral-tiny"])
def test_workload_flops_match_models_flops(name):
    ours, theirs = model_flops_check(get_preset(name), 4096)
    assert ours == theirs
