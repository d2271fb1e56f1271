"""Inputs: the shipped failure-rate file, user TOML files, and `gigafactory plan` JSON. Bad input = one-line UserError."""

from __future__ import annotations

import json
import tomllib

import pytest

from gigafactory.errors import UserError
from gigafactory.simulate import ClusterSpec, JobSpec, RecoverySpec, SimConfig, SimSpec, simulate
from gigafactory.simulate.failures import default_rates_path, load_failure_classes, override_rates
from gigafactory.simulate.plan_input import read_plan


def test_every_shipped_rate_cites_a_source_and_the_total_matches_llama3():
    classes = load_failure_classes()
    assert len(classes) >= 10
    assert all(c.source and c.rate > 0 for c in classes)
    text = default_rates_path().read_text()
    for needle in ("Llama 3", "Kokolis", "CAVEATS", "assumption"):
        assert needle in text
    # 419 interruptions / (54 days x 2,048 nodes of 8 GPUs); a per-job class counts once for the whole 2,048-node job
    per_node_day = sum(c.rate * {"gpu": 8, "node": 1, "job": 1 / 2048}[c.per] for c in classes)
    assert per_node_day == pytest.approx(419 / (54 * 2048), rel=0.002)
    assert tomllib.loads(text)["meta"]["node_days"] == 54 * 2048


def _write(tmp_path, body: str):
    p = tmp_path / "rates.toml"
    p.write_text(body)
    return p


@pytest.mark.parametrize(
    "body,needle",
    [
        ('[classes.gpu]\nrate = -1e-4\n', "rate=-0.0001 must be a number >= 0"),
        ('[classes.gpu]\nrate = 1e-4\nper = "rack"\n', "per='rack' is not one of: gpu, node"),
        ('[classes.gpu]\nrate = 1e-4\nrepiar_s = 5\n', "unknown key 'repiar_s'"),
        ('[classes.gpu]\nper = "gpu"\n', "missing 'rate'"),
        ('[classes.gpu]\nrate = 1e-4\nnodes_affected = 0\n', "nodes_affected=0"),
        ('[component.gpu]\nrate = 1e-4\n', "unknown table [component]"),
        ('[classes.gpu\nrate = 1', "not valid TOML"),
    ],
)
def test_bad_rate_files_are_one_line_errors(tmp_path, body, needle):
    with pytest.raises(UserError) as err:
        load_failure_classes(_write(tmp_path, body))
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_unknown_component_and_negative_override_are_errors():
    classes = load_failure_classes()
    with pytest.raises(UserError, match="unknown component 'gpuu' in --rate; known components: gpu, hbm"):
        override_rates(classes, {"gpuu": 1e-4})
    with pytest.raises(UserError, match="rate=-1.0 must be a number >= 0"):
        override_rates(classes, {"gpu": -1.0})
    assert override_rates(classes, {"gpu": 0.0})[0].rate == 0.0


@pytest.mark.parametrize(
    "cluster,job,needle",
    [
        (ClusterSpec(gpus=100, gpus_per_node=8), JobSpec(), "inconsistent node size: gpus=100 is not a multiple of gpus_per_node=8"),
        (ClusterSpec(), JobSpec(checkpoint_policy="fixed", checkpoint_interval_s=0.0), "checkpoint interval 0.0 s must be > 0"),
        (ClusterSpec(), JobSpec(checkpoint_policy="fixed", checkpoint_interval_s=-5.0), "checkpoint interval -5.0 s must be > 0"),
        (ClusterSpec(spare_nodes=-3), JobSpec(), "spare_nodes=-3"),
        (ClusterSpec(), JobSpec(step_time_s=0.0), "step_time_s=0.0 must be > 0"),
        (ClusterSpec(), JobSpec(checkpoint_s=-1.0), "checkpoint_s=-1.0 must be a finite number >= 0"),
        (ClusterSpec(rate_scale=-1.0), JobSpec(), "rate_scale=-1.0"),
    ],
)
def test_bad_configs_are_one_line_errors(cluster, job, needle):
    with pytest.raises(UserError) as err:
        simulate(SimConfig(cluster=cluster, job=job, sim=SimSpec(days=1)))
    assert needle in str(err.value) and "\n" not in str(err.value)


PLAN = [
    {"gpus": 10000, "step_time_s": 12.5, "tokens_per_step": 8388608, "checkpoint_time_s": 45.0, "mfu": 0.4},
    {"gpus": 100000, "step_time_s": 2.5, "tokens_per_step": 16777216},
]


@pytest.mark.parametrize("shape", ["list", "object", "nested"])
def test_plan_json_in_any_shape(tmp_path, shape):
    data = {"list": PLAN, "object": PLAN[0], "nested": {"model": "grok-1", "results": PLAN}}[shape]
    p = tmp_path / "plan.json"
    p.write_text(json.dumps(data))
    first = read_plan(str(p))
    assert first == {"gpus": 10000, "step_time_s": 12.5, "tokens_per_step": 8388608, "checkpoint_s": 45.0}
    if shape != "object":
        assert read_plan(str(p), gpus=100000) == {"gpus": 100000, "step_time_s": 2.5, "tokens_per_step": 16777216}


def test_plan_errors(tmp_path):
    p = tmp_path / "plan.json"
    p.write_text(json.dumps(PLAN))
    with pytest.raises(UserError, match=r"no entry for --gpus 5000 \(it has: 10000, 100000\)"):
        read_plan(str(p), gpus=5000)
    p.write_text(json.dumps([{"gpus": 8, "step_time_s": -1, "tokens_per_step": 1}]))
    with pytest.raises(UserError, match="step_time_s=-1 must be a positive number"):
        read_plan(str(p))
    p.write_text("{not json")
    with pytest.raises(UserError, match="is not valid JSON"):
        read_plan(str(p))
    with pytest.raises(UserError, match="not found"):
        read_plan(str(tmp_path / "missing.json"))


@pytest.mark.parametrize(
    "body,needle",
    [
        ('[classes.s]\nrate = 0.1\nper = "job"\nrepair_s = 60\n', "a per-job class takes no node out"),
        ('[classes.s]\nrate = 0.1\nhangs = "yes"\n', "hangs must be true or false"),
        ('[classes.s]\nrate = 0.1\noutage_s = -1\n', "outage_s=-1 must be a number >= 0"),
    ],
)
def test_bad_new_class_keys_are_one_line_errors(tmp_path, body, needle):
    with pytest.raises(UserError) as err:
        load_failure_classes(_write(tmp_path, body))
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_job_wide_rates_do_not_grow_with_the_job_and_shipped_classes_include_correlated_and_job_wide():
    classes = {c.name: c for c in load_failure_classes()}
    job_wide = [c for c in classes.values() if c.per == "job"]
    assert job_wide and all(c.source for c in job_wide)
    small, big = ClusterSpec(gpus=8192), ClusterSpec(gpus=100_000)
    assert all(c.rate_per_s(small) == c.rate_per_s(big) for c in job_wide)
    assert any(c.nodes_affected > 1 for c in classes.values())
    assert classes["silent_data_corruption"].spreads and classes["nccl_watchdog"].hangs


@pytest.mark.parametrize(
    "recovery,needle",
    [
        (RecoverySpec(recovery="replica", replica_group_gpus=12), "replica_group_gpus=12 must be a positive multiple of gpus_per_node=8"),
        (RecoverySpec(recovery="replica", replica_group_gpus=8, min_replicas=99), "min_replicas=99 must be an integer in 1..8"),
        (RecoverySpec(recovery="replica", peer_gbps_per_gpu=0.0), "peer_gbps_per_gpu=0.0 must be a finite number > 0"),
        (RecoverySpec(recovery="sideways"), "recovery='sideways' is not one of"),
        (RecoverySpec(quorum_s=float("inf")), "quorum_s=inf must be a finite number >= 0"),
    ],
)
def test_bad_recovery_knobs_are_one_line_errors(recovery, needle):
    with pytest.raises(UserError) as err:
        simulate(SimConfig(cluster=ClusterSpec(gpus=64), sim=SimSpec(days=1), recovery=recovery))
    assert needle in str(err.value) and "\n" not in str(err.value)
