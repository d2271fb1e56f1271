"""The power profile: a step's phases, checkpoint/restart pauses, the swing in MW and MW/s, and energy from phases."""

import dataclasses

import pytest

from gigafactory.models.presets import get_preset
from gigafactory.plan.cost import estimate
from gigafactory.plan.forecast import forecast
from gigafactory.plan.hardware import make_cluster
from gigafactory.plan.layout import MODERN, Layout
from gigafactory.plan.power import PowerModel, profile
from gigafactory.plan.reliability import with_failures
from gigafactory.plan.workload import from_model_config

W = from_model_config(get_preset("grok-1b-moe"))


def _planned(n: int, lay: Layout):
    cluster = make_cluster("h100", n)
    return cluster, estimate(W, lay, cluster, MODERN, 4096)


def test_swing_is_the_used_gpus_dropping_from_tdp_to_idle():
    cluster, est = _planned(1024, Layout(dp_replicate=16, dp_shard=64, ep=8, microbatches=1, zero=1))
    p = profile(est, cluster, checkpoint_s=5.0, restart_s=600.0)
    g = cluster.gpu
    assert p["swing_mw"] == pytest.approx(1024 * (g.tdp_w - g.idle_w) / 1e6)
    assert p["swing_mw_per_s"] == pytest.approx(p["swing_mw"] / max(PowerModel().response_s, est.phases["optimizer"]))
    assert p["checkpoint_pause"]["it_mw"] < p["step_avg_it_mw"] <= p["peak_it_mw"]
    assert sum(ph["seconds"] for ph in p["step_phases"]) == pytest.approx(est.step_time_s)


def test_swing_scales_with_the_gpus_and_spares_idle():
    _, est = _planned(1024, Layout(dp_replicate=16, dp_shard=64, ep=8, microbatches=1, zero=1))
    small = profile(est, make_cluster("h100", 1024), 5.0, 600.0)
    spares = profile(est, make_cluster("h100", 2048), 5.0, 600.0)
    assert spares["swing_mw"] == pytest.approx(small["swing_mw"])  # spares do not swing
    assert spares["checkpoint_pause"]["it_mw"] > small["checkpoint_pause"]["it_mw"]


def test_bubbles_lower_the_average_power_and_energy_is_below_peak_power_times_time():
    cluster = make_cluster("h100", 1024)
    flat = estimate(W, Layout(dp_replicate=16, dp_shard=64, ep=8, microbatches=1, zero=1), cluster, MODERN, 4096)
    piped = estimate(W, Layout(dp_replicate=1, dp_shard=64, pp=16, ep=8, microbatches=4, schedule="1f1b", zero=1), cluster, MODERN, 4096)
    a, b = profile(flat, cluster, 5, 600), profile(piped, cluster, 5, 600)
    assert piped.phases["idle"] > flat.phases["idle"] and b["step_avg_it_mw"] < a["step_avg_it_mw"]
    fc = forecast(flat, W, cluster, 1e11)
    fail = with_failures(flat, fc, W, cluster, "job-restart")
    peak_energy = fc.facility_mw * fc.days * 24 / fail["ettr"]
    assert 0 < fail["energy_mwh"] < peak_energy
    none = with_failures(flat, fc, W, dataclasses.replace(cluster, gpu_failures_per_day=0.0), "job-restart")
    assert none["energy_mwh"] == pytest.approx(none["energy_mwh_failure_free"]) and none["energy_mwh"] < fail["energy_mwh"]
