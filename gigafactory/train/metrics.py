"""Per-step metrics to JSONL and TensorBoard, a progress bar with ETA, and MFU against a device peak."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from gigafactory.plan.hardware import load_catalog

_CPU_GUESS_TFLOPS = 0.5  # CPUs vary too much to know; set logging.peak_tflops for a real MFU


def peak_tflops(device: torch.device, configured: float) -> float:
    """logging.peak_tflops if set; else a GPU's dense bf16 peak from the planner's cited catalog (plan/hardware.toml);
    0 for a GPU the catalog lacks (no MFU is logged then: set logging.peak_tflops)."""
    if configured > 0:
        return configured
    if device.type != "cuda":
        return _CPU_GUESS_TFLOPS
    name = torch.cuda.get_device_name(device).lower()  # e.g. "nvidia h100 80gb hbm3"
    gpus = load_catalog().gpus
    keys = sorted(gpus, key=len, reverse=True)  # "gb200" before "b200"
    for key in keys:  # a variant named in full ("a100 80gb") first, then the family ("a100")
        if key.replace("-", " ") in name:
            return gpus[key].bf16_tflops
    for key in keys:
        if key.split("-")[0] in name:
            return gpus[key].bf16_tflops
    return 0.0


class MetricsLogger:
    """Writes metrics.jsonl (one JSON object per logged step) and TensorBoard scalars; rank 0 only."""

    def __init__(self, run_dir: Path, tensorboard: bool, enabled: bool = True):
        self.enabled = enabled
        self.file = open(run_dir / "metrics.jsonl", "a") if enabled else None
        self.tb = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"))

    def log(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


class StepProgress:
    """A rich progress bar on a terminal; plain log lines otherwise (CI logs, files)."""

    def __init__(self, total: int, start: int, enabled: bool):
        self.enabled = enabled
        self.live = enabled and sys.stdout.isatty()
        self.bar = None
        if self.live:
            self.bar = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            )
            self.task = self.bar.add_task("train", total=total, completed=start, info="")
            self.bar.start()

    def update(self, step: int, info: str, log_line: bool) -> None:
        if self.live:
            self.bar.update(self.task, completed=step, info=info)
        elif self.enabled and log_line:
            print(f"step {step}: {info}", flush=True)

    def print(self, message: str) -> None:
        if not self.enabled:
            return
        (self.bar.console.print if self.live else print)(message)

    def close(self) -> None:
        if self.live:
            self.bar.stop()


class BoardPower:
    """This rank's GPU board power from NVML (nvidia-ml-py), in W; `read()` is None where NVML cannot tell, and
    `status` says why (never a guessed number)."""

    def __init__(self, device: torch.device):
        self.handle, self.status = None, "nvml"
        if device.type != "cuda":
            self.status = "absent: not a GPU"
            return
        try:
            import pynvml
        except ImportError:
            self.status = "absent: nvidia-ml-py (pynvml) not installed"
            return
        try:
            pynvml.nvmlInit()
            index = device.index if device.index is not None else torch.cuda.current_device()
            self.handle, self._read = pynvml.nvmlDeviceGetHandleByIndex(_physical_index(index)), pynvml.nvmlDeviceGetPowerUsage
        except Exception as err:  # noqa: BLE001 - no driver, no such device, an NVML without power readings
            self.status = f"absent: NVML: {str(err)[:80]}"

    def read(self) -> float | None:
        if self.handle is None:
            return None
        try:
            return self._read(self.handle) / 1000.0  # mW
        except Exception as err:  # noqa: BLE001 - a board that does not report power
            self.status, self.handle = f"absent: NVML: {str(err)[:80]}", None
            return None


def _physical_index(index: int) -> int:
    """NVML numbers GPUs physically; CUDA_VISIBLE_DEVICES may renumber them for torch."""
    import os

    visible = [v for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if index < len(visible) and visible[index].strip().isdigit():
        return int(visible[index])
    return index
