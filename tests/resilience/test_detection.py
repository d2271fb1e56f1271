"""Watchdog, anomaly guard (NaN + spike), straggler report, events and restart accounting, fault hooks."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
import time

import torch
from torch import nn

from gigafactory.config.job import FaultConfig, ResilienceConfig
from gigafactory.resilience import (EXIT_HANG, AnomalyGuard, EventLog, FaultInjector, SpikeDetector,
                                    StragglerMonitor, Watchdog, read_events, record_start, straggler_report)
from gigafactory.resilience.heartbeat import read_heartbeat, write_heartbeat


def test_watchdog_kills_hung_process_within_timeout(tmp_path):
    script = textwrap.dedent(f"""
        import time
        from gigafactory.resilience import EventLog, Watchdog
        ev = EventLog({str(tmp_path / 'events.jsonl')!r}, rank=1)
        wd = Watchdog(1.0, rank=1, events=ev, heartbeat_path={str(tmp_path / 'hb.json')!r}).start()
        for step in range(1, 4):
            time.sleep(0.1)
            wd.beat(step)
        print("hanging", flush=True)
        time.sleep(60)  # a hang: no more beats
    """)
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    elapsed = time.monotonic() - started
    assert proc.returncode == EXIT_HANG, proc.stderr
    assert "completed no step" in proc.stderr and "hanging" in proc.stdout
    assert elapsed < 15
    (rec,) = read_events(tmp_path / "events.jsonl")
    assert rec["event"] == "hang" and rec["rank"] == 1 and rec["step"] == 4 and 1.0 < rec["stalled_s"] < 3.0
    assert read_heartbeat(tmp_path / "hb.json")["step"] == 3


def test_watchdog_pause_and_stop():
    fired = []
    wd = Watchdog(0.3, on_timeout=fired.append, poll_s=0.02).start()
    with wd.paused():
        time.sleep(0.5)  # evaluation/saving inside paused() is not a hang
    wd.beat(1)
    wd.stop()
    assert not fired
    wd = Watchdog(0.2, on_timeout=fired.append, poll_s=0.02).start(step=5)
    time.sleep(0.6)
    assert fired and fired[0]["step"] == 6
    wd.stop()


def test_spike_detector_zscore():
    det = SpikeDetector(zscore=4.0, window=20)
    losses = [3.0 + 0.01 * math.sin(i) for i in range(20)]
    for x in losses:
        assert det.is_spike(x) == (False, 0.0)  # window not full yet: never a spike
        det.accept(x)
    assert not det.is_spike(3.01)[0]
    spike, z = det.is_spike(3.5)
    assert spike and z > 4
    det.load_state_dict(det.state_dict())
    assert len(det.history) == 20


def _warm(guard, steps=10):
    for step in range(1, steps + 1):
        assert guard.check(step, 2.0 + 0.01 * (step % 3), 1.0).action == "ok"


def test_anomaly_guard_actions_without_rerun(tmp_path):
    ev = EventLog(tmp_path / "events.jsonl")
    cfg = ResilienceConfig(on_nan="rollback", on_spike="skip", spike_zscore=5.0, spike_window=10, max_rollbacks=1, rerun_anomalies=False)
    guard = AnomalyGuard(cfg, ev)
    _warm(guard)
    assert guard.check(11, 9.0, 1.0).action == "skip"  # spike
    assert guard.check(11, 2.01, 1.0).action == "ok"
    assert guard.check(12, float("nan"), 1.0).action == "rollback"
    stop = guard.check(12, 2.0, float("inf"))  # second NaN at the same step: rollbacks exhausted -> stop, as --help says
    assert stop.action == "stop" and "rolled back 1 time(s) at step 12" in stop.note
    recs = read_events(tmp_path / "events.jsonl")
    assert [(r["event"], r["action"]) for r in recs] == [("spike", "skip"), ("nan", "rollback"), ("nan", "stop")]
    assert recs[1]["loss"] == "nan" and recs[2]["loss"] == 2.0 and recs[2]["grad_norm"] == "inf"


def test_rerun_tells_transient_from_real(tmp_path):
    ev = EventLog(tmp_path / "events.jsonl")
    guard = AnomalyGuard(ResilienceConfig(on_spike="rollback", spike_zscore=5.0, spike_window=10), ev)
    _warm(guard)
    first = guard.check(11, 40.0, 1.0)
    assert first.action == "rerun" and first.reason == "spike" and read_events(tmp_path / "events.jsonl") == []
    assert guard.judge_rerun(11, first, 40.0, 2.01, 1.0).action == "ok"  # clean re-run: a transient fault
    assert guard.spikes.history[-1] == 2.01 and guard.rollbacks_at == {}
    first = guard.check(12, 40.0, 1.0)
    real = guard.judge_rerun(12, first, 40.0, 40.0, 1.0)  # the same result again: real -> the configured action
    assert real.action == "rollback" and guard.rollbacks_at == {12: 1}
    nan = guard.check(13, float("nan"), 1.0)
    assert nan.action == "rerun" and guard.judge_rerun(13, nan, float("nan"), float("nan"), 1.0).action == "skip"
    assert [(r["event"], r["action"]) for r in read_events(tmp_path / "events.jsonl")] == [
        ("transient_fault", "ok"), ("spike", "rollback"), ("nan", "skip")]


def test_skipped_spikes_enter_the_window_so_a_new_level_is_learned():
    guard = AnomalyGuard(ResilienceConfig(on_spike="skip", spike_zscore=3.0, spike_window=5, rerun_anomalies=False))
    _warm(guard, 5)
    actions = [guard.check(step, 5.0, 1.0).action for step in range(6, 16)]  # the loss level jumps and stays
    assert actions[0] == "skip" and actions[-1] == "ok"  # judged against the new level after a few steps


def test_guard_state_round_trips_and_rollback_keeps_counts():
    guard = AnomalyGuard(ResilienceConfig(on_nan="rollback", spike_window=4, rerun_anomalies=False))
    _warm(guard, 6)
    assert guard.check(7, float("nan"), 1.0).action == "rollback"
    state = json.loads(json.dumps(guard.state_dict()))  # what a checkpoint stores
    other = AnomalyGuard(ResilienceConfig(on_nan="rollback", spike_window=4))
    other.load_state_dict(state)
    assert list(other.spikes.history) == list(guard.spikes.history) and other.rollbacks_at == {7: 1}
    other.rollbacks_at[7] = 2
    other.load_state_dict({"spikes": {"history": [1.0, 2.0]}}, keep_rollback_counts=True)
    assert list(other.spikes.history) == [1.0, 2.0] and other.rollbacks_at == {7: 2}


def test_spike_fault_scales_loss_and_grads_and_repeats(tmp_path):
    model = nn.Linear(4, 4)
    model(torch.randn(2, 4)).sum().backward()
    before = model.weight.grad.clone()
    inj = FaultInjector(FaultConfig(spike_step=3, spike_scale=10.0, anomaly_repeats=2), rank=0, run_dir=tmp_path)
    assert inj.after_backward(2, model) == 1.0
    assert inj.after_backward(3, model) == 10.0 and torch.equal(model.weight.grad, before * 10)
    assert inj.after_backward(3, model) == 10.0  # the re-run shows it too: a fault in the data
    assert FaultInjector(FaultConfig(spike_step=3, anomaly_repeats=2), rank=0, run_dir=tmp_path).after_backward(3, model) == 1.0


def test_nan_fault_reaches_grad_norm(tmp_path):
    model = nn.Linear(4, 4)
    model(torch.randn(2, 4)).sum().backward()
    inj = FaultInjector(FaultConfig(nan_step=3, nan_rank=0), rank=0, run_dir=tmp_path, events=EventLog(tmp_path / "e.jsonl"))
    inj.after_backward(2, model)
    assert math.isfinite(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9)))
    inj.after_backward(3, model)
    assert not math.isfinite(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9)))
    assert AnomalyGuard(ResilienceConfig(), None).check(3, 1.0, float("nan")).action == "rerun"
    assert [r["kind"] for r in read_events(tmp_path / "e.jsonl")] == ["nan"]


def test_straggler_report_names_slowest():
    rep = straggler_report([1.0, 1.02, 1.9, 0.98], ratio=1.2, top=2)
    assert rep["slowest"][0][0] == 2 and rep["stragglers"] == [2] and rep["slowest"][1][0] == 1
    mon = StragglerMonitor(every=2)
    assert mon.step_done(1, 0.5) is None
    assert mon.step_done(2, 0.7)["per_rank_s"] == [0.6]


def test_restart_accounting(tmp_path):
    hb = tmp_path / "heartbeat.json"
    ev = EventLog(tmp_path / "events.jsonl")
    assert record_start(ev, hb, resumed_step=0, world_size=2, tokens_per_step=256) is None  # fresh run
    write_heartbeat(hb, 7)
    ev.record("fault_injected", kind="kill", step=7)
    rec = record_start(ev, hb, resumed_step=5, world_size=2, tokens_per_step=256)
    assert rec["event"] == "restart" and rec["steps_lost"] == 2 and rec["what"] == "kill" and rec["downtime_s"] >= 0
    write_heartbeat(hb, 9, finished=True)
    assert record_start(ev, hb, resumed_step=9, world_size=2, tokens_per_step=256) is None
