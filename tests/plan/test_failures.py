"""`plan` pays for failures: ETTR of the chosen recovery mode scales days, GPU-hours, energy and $; bad inputs are one line."""

import dataclasses
import json
import time

import pytest

from gigafactory.errors import UserError
from gigafactory.models.presets import get_preset
from gigafactory.plan.forecast import forecast
from gigafactory.plan.hardware import make_cluster
from gigafactory.plan.cost import estimate
from gigafactory.plan.layout import MODERN, Layout
from gigafactory.plan.reliability import with_failures
from gigafactory.plan.search import SearchSpace, search
from gigafactory.plan.workload import from_model_config


@pytest.fixture(scope="module")
def planned():
    w = from_model_config(get_preset("grok-1b-moe"))
    cluster = make_cluster("h100", 1024)
    # HSDP: 16 replica groups of 64 GPUs, so replica recovery has groups to drop
    lay = Layout(dp_replicate=16, dp_shard=64, ep=8, zero=1, microbatches=1)
    est = estimate(w, lay, cluster, MODERN, 4096)
    assert est.fits
    return w, cluster, est


def _with_rate(planned, rate: float, recovery: str = "job-restart") -> dict:
    w, cluster, est = planned
    c = dataclasses.replace(cluster, gpu_failures_per_day=rate)
    return with_failures(est, forecast(est, w, c, 1e11), w, c, recovery)


@pytest.mark.parametrize("recovery", ["job-restart", "replica"])
def test_days_grow_with_failure_rate_and_equal_failure_free_days_at_zero(planned, recovery):
    rows = [_with_rate(planned, r, recovery) for r in (0.0, 1e-4, 4.7e-4, 2e-3, 1e-2)]
    assert rows[0]["ettr"] == 1.0 and rows[0]["days"] == rows[0]["days_failure_free"] and rows[0]["cost_usd"] == rows[0]["cost_usd_failure_free"]
    days = [r["days"] for r in rows]
    assert all(a < b for a, b in zip(days, days[1:]))
    for r in rows:
        assert r["gpu_hours"] / r["gpu_hours_failure_free"] == pytest.approx(1 / r["ettr"])
        assert r["cost_usd"] / r["cost_usd_failure_free"] == pytest.approx(1 / r["ettr"])


def test_replica_recovery_never_costs_more_days(planned):
    for rate in (1e-4, 4.7e-4, 2e-3):
        job, rep = _with_rate(planned, rate), _with_rate(planned, rate, "replica")
        assert rep["days"] <= job["days"] and rep["restarting_failures_per_day"] < job["restarting_failures_per_day"]
        assert rep["interruptions_per_day"] == pytest.approx(job["interruptions_per_day"])


def test_failure_model_is_cheap(planned):
    start = time.perf_counter()
    for _ in range(20):
        _with_rate(planned, 4.7e-4, "replica")
    assert (time.perf_counter() - start) / 20 < 0.05


def test_cli_prints_ettr_next_to_days_and_cost(run_plan):
    code, out = run_plan("--model", "grok-1b-moe", "--gpus", "1024", "--gpu", "h100", "--tokens", "1e11", "--recovery", "replica")
    assert code == 0 and "ETTR" in out and "failure-free" in out and "recovery" in out and "replica" in out
    code, out = run_plan("--model", "grok-1b-moe", "--gpus", "1024", "--gpu", "h100", "--tokens", "1e11", "--json")
    row = json.loads(out)[0]
    assert row["recovery"] == "job-restart" and 0 < row["ettr"] < 1 and row["days"] > row["days_failure_free"]
    assert row["replica_group_gpus"] % 8 == 0 and row["params"] > 0


@pytest.mark.parametrize("argv, needle", [
    (["--pue", "-1"], "--pue -1.0 must be a finite number >= 1"),
    (["--usd-per-gpu-hour", "-1"], "--usd-per-gpu-hour -1.0 must be a finite number >= 0"),
    (["--failures-per-gpu-day", "-1"], "--failures-per-gpu-day -1.0 must be a finite number >= 0"),
    (["--failures-per-gpu-day", "nan"], "--failures-per-gpu-day nan must be a finite number"),
    (["--tokens", "nan"], "--tokens must be a finite number > 0"),
    (["--tokens", "inf"], "--tokens must be a finite number > 0"),
])
def test_bad_numbers_are_one_line(run_plan, argv, needle):
    with pytest.raises(UserError) as err:
        run_plan("--model", "grok-1b-moe", "--gpus", "64", *argv)
    assert needle in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("body, needle", [
    ("[clusterr]\npue = 1.1\n", "unknown table [clusterr]"),
    ("[cluster]\npuee = 1.1\n", "unknown key 'puee' in [cluster]"),
    ("[cluster]\npue = -1.0\n", "[cluster] pue=-1.0 must be a finite number >= 1"),
    ("[cluster]\ngpu = 5\n", "[cluster] gpu must be a name"),
])
def test_bad_cluster_files_are_one_line(run_plan, tmp_path, body, needle):
    f = tmp_path / "c.toml"
    f.write_text(body)
    with pytest.raises(UserError) as err:
        run_plan("--model", "grok-1b-moe", "--gpus", "64", "--cluster", str(f))
    assert needle in str(err.value) and "\n" not in str(err.value)
