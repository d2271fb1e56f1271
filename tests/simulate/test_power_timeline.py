"""Facility power over a simulated run: states rebuilt from the timeline, swings in MW and MW/s, and what the
trainer's smoothing (floor while paused alive, ramp at start-up) changes and costs."""

from __future__ import annotations

import json

import pytest

from gigafactory.cli import main as cli_main
from gigafactory.simulate.engine import RunResult
from gigafactory.simulate.power import PowerSpec, energy_mwh, power_report, states, swings, trace

GPUS = 1000


def fake_run(timeline) -> RunResult:
    return RunResult(seed=0, horizon_s=timeline[-1][1], interval_s=300.0, useful_s=0.0, lost_s=0.0, state_s={}, interruptions={},
                     non_fatal={}, during_maintenance=0, maintenance_windows=0, timeline=list(timeline))


RUN = fake_run([(0, 400, "run"), (400, 1000, "run"), (1000, 1100, "detect"), (1100, 1200, "restart"), (1200, 2000, "run")])


def test_run_phases_split_into_compute_and_checkpoint_stalls():
    seg = states(RUN, interval_s=300.0, stall_s=50.0)
    assert seg[:5] == [(0, 300, "compute"), (300, 350, "checkpoint"), (350, 650, "compute"), (650, 700, "checkpoint"), (700, 1000, "compute")]
    assert seg[5:8] == [(1000, 1100, "detect"), (1100, 1200, "restart"), (1200, 1500, "compute")]  # a restart begins a new period


def test_swings_plain_and_smoothed():
    spec = PowerSpec(gpu_busy_w=700, gpu_idle_w=100, host_w_per_gpu=500, pue=1.25, transition_s=2.0, power_floor=0.5, ramp_s=100.0)
    seg = states(RUN, 300.0, 50.0)
    full = 1.25 * GPUS * 600 / 1e6  # busy - idle, facility MW
    plain = swings(trace(spec, GPUS, seg, False), seg)
    assert plain["swing_mw"] == pytest.approx(full) and plain["mw_per_s"] == pytest.approx(full / 2.0)
    assert plain["by_cause"]["compute -> checkpoint"]["mw"] == pytest.approx(full)
    smooth = swings(trace(spec, GPUS, seg, True), seg)
    assert smooth["by_cause"]["compute -> checkpoint"]["mw"] == pytest.approx(1.25 * GPUS * 350 / 1e6)  # down to the floor only
    assert smooth["by_cause"]["compute -> detect"]["mw"] == pytest.approx(full)  # a crash: nothing left to hold the floor
    assert smooth["by_cause"]["restart -> compute"]["mw_per_s"] == pytest.approx(full / 100.0)  # idle -> busy in ramp_s
    assert smooth["by_cause"]["detect -> restart"]["mw_per_s"] == pytest.approx(full / 100.0)


def test_floor_energy_is_the_filler_work_in_pauses():
    spec = PowerSpec(gpu_busy_w=700, gpu_idle_w=100, host_w_per_gpu=0, pue=1.0, transition_s=1e-3, power_floor=0.5)
    seg = states(RUN, 300.0, 50.0)
    extra = energy_mwh(trace(spec, GPUS, seg, True)) - energy_mwh(trace(spec, GPUS, seg, False))
    paused_s = 4 * 50 + 100  # four checkpoint stalls (two per run) and the restart
    assert extra == pytest.approx(paused_s * GPUS * (350 - 100) / 1e6 / 3600, rel=1e-3)
    rep = power_report(spec, [RUN], GPUS, 300.0, 50.0)
    assert rep["smoothing_cost"]["extra_energy_mwh"] == pytest.approx(extra) and rep["smoothing_cost"]["restarts"] == 1


@pytest.fixture
def run_cli(monkeypatch, capsys):
    monkeypatch.setattr(cli_main, "COMMANDS", ("simulate",))

    def run(*argv: str):
        try:
            code = cli_main.main(["simulate", *argv])
        except SystemExit as exc:
            code = exc.code
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


def test_cli_power_json_table_and_plot(run_cli, tmp_path):
    code, out, _ = run_cli("--gpus", "16384", "--days", "3", "--power", "--power-floor", "0.4", "--ramp-s", "30", "--json")
    assert code == 0
    p = json.loads(out)["power"]
    assert p["plain"]["swing_mw"] == pytest.approx(p["busy_mw"] - p["idle_mw"])
    assert p["smoothed"]["by_cause"]["compute -> checkpoint"]["mw"] < p["plain"]["by_cause"]["compute -> checkpoint"]["mw"]
    assert p["smoothing_cost"]["extra_energy_mwh"] > 0
    png = tmp_path / "power.png"
    code, out, _ = run_cli("--gpus", "16384", "--days", "3", "--power-plot", str(png))
    assert code == 0 and "facility power" in out and "largest (worst seed)" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv,needle", [
    (["--power", "--pue", "0.9"], "pue=0.9 must be >= 1"),
    (["--power", "--power-floor", "1.5"], "power_floor=1.5 must be in [0, 1]"),
    (["--power", "--sweep", "gpus=8,16"], "--power/--power-plot need one configuration"),
])
def test_bad_power_input_is_one_line(run_cli, argv, needle):
    code, out, err = run_cli(*argv, "--days", "1")
    assert code == 2 and out == "" and err.count("\n") == 1 and needle in err, err


def test_simulate_help_renders_the_power_flags():
    """argparse %-formats help strings: a bare '%' in a knob's help made `simulate --help` a traceback."""
    import argparse

    from gigafactory.cli import simulate

    parser = argparse.ArgumentParser()
    simulate.register(parser.add_subparsers())
    sub = parser._subparsers._group_actions[0].choices["simulate"]
    assert "--power-floor" in sub.format_help() and "--gpu-idle-w" in sub.format_help()
