"""The trainer's power smoothing: filler work at the floor's duty while paused alive, a throttled start-up ramp,
and board power that is read from NVML or reported absent, never made up."""

from __future__ import annotations

import time

import torch

from gigafactory.train import power_smoothing
from gigafactory.train.metrics import BoardPower
from gigafactory.train.power_smoothing import PowerFloor, PowerSmoothing


def test_floor_keeps_the_device_busy_its_fraction_of_the_time():
    floor = PowerFloor(0.5, torch.device("cpu"))
    start = time.perf_counter()
    with floor.held():
        time.sleep(0.6)
    held = time.perf_counter() - start  # includes the last burst, which stop() waits for
    assert not floor.running
    assert 0.3 * held < floor.busy_s < 0.7 * held, (floor.busy_s, held)
    off = PowerFloor(0.0, torch.device("cpu"))
    off.start()
    assert not off.running


def test_ramp_throttles_steps_from_the_floor_to_full_speed(monkeypatch):
    slept = []
    monkeypatch.setattr(power_smoothing.time, "sleep", slept.append)
    clock = [100.0]
    monkeypatch.setattr(power_smoothing.time, "monotonic", lambda: clock[0])
    ramp = PowerSmoothing(floor=0.5, ramp_s=10.0, device=torch.device("cpu"))
    assert [ramp.duty(t) for t in (0, 5, 10, 20)] == [0.5, 0.75, 1.0, 1.0]
    # the first 1 s step began at 99: 1 s into the ramp the duty is 0.55, so the step is followed by 1/0.55 - 1 s
    assert abs(ramp.step_done(1.0) - (1 / 0.55 - 1)) < 1e-9
    clock[0] = 106.0  # 7 s into the ramp: duty 0.85
    assert abs(ramp.step_done(1.0) - (1 / 0.85 - 1)) < 1e-9
    clock[0] = 108.9  # a long step 0.1 s before the ramp ends: the pause stops there
    assert abs(ramp.step_done(100.0) - 0.1) < 1e-9
    clock[0] = 200.0
    assert ramp.step_done(1.0) == 0.0 and len(slept) == 3
    assert PowerSmoothing(floor=0.0, ramp_s=10.0, device=torch.device("cpu")).duty(0) == power_smoothing.MIN_START_DUTY


def test_board_power_is_absent_off_gpu_never_guessed():
    reader = BoardPower(torch.device("cpu"))
    assert reader.read() is None and reader.status.startswith("absent")


def test_trainer_holds_the_floor_through_saves_and_ramps_at_start(tiny_job):
    from gigafactory.train.trainer import Trainer

    cfg = tiny_job(training__steps=2, training__eval_every=0, resilience__power_floor=0.25, resilience__power_ramp_s=0.3)
    trainer = Trainer(cfg)
    try:
        trainer.train()
        assert trainer.power.filler.busy_s > 0 and not trainer.power.filler.running
        assert trainer.power.throttled_s > 0
    finally:
        trainer.close()
