"""A stop signal at an eval point with eval.tasks: the suites give way, so the final save fits in term_grace_s."""

from __future__ import annotations

import os
import signal
import time
from types import SimpleNamespace

import torch

from gigafactory.config.job import JobConfig
from gigafactory.train.evaluation import SuiteResult, TaskSuites, eval_point
from gigafactory.train.interrupt import StopSignals


class SlowSuite:
    """A suite that takes far longer than the test allows, unless something ends it."""
    name = "slow"

    def __init__(self, send_signal: bool):
        self.send_signal, self.ran = send_signal, False

    def run(self, model):
        self.ran = True
        if self.send_signal:
            os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
        return SuiteResult("slow", {}, {"score": 1.0})


class Watchdog:
    def paused(self):
        from contextlib import nullcontext
        return nullcontext()


def _eval_point(tmp_path, suite, signal_before: bool):
    cfg = JobConfig()
    cfg.training.eval_every, cfg.eval.tasks = 1, ["kjv"]
    signals = StopSignals(60.0).install()
    lines = []
    trainer = SimpleNamespace(step=1, cfg=cfg, task_suites=TaskSuites([suite], lambda *a: None), signals=signals,
                              device=torch.device("cpu"), watchdog=Watchdog(), evaluate=lambda: 2.5, run_dir=tmp_path,
                              rank=0, pmodel=SimpleNamespace(parts=[torch.nn.Linear(1, 1)]))
    summary = {"eval": []}
    try:
        if signal_before:
            os.kill(os.getpid(), signal.SIGTERM)
        started = time.monotonic()
        eval_point(trainer, SimpleNamespace(log=lambda *a: None), SimpleNamespace(print=lines.append), summary)
        elapsed = time.monotonic() - started
    finally:
        signals.restore()  # also cancels the grace timer
    assert signals.name == "SIGTERM" and signal.getsignal(signal.SIGTERM) is not None
    return summary, lines, elapsed


def test_a_signal_during_the_suites_cuts_them_short_on_one_process(tmp_path):
    suite = SlowSuite(send_signal=True)
    summary, lines, elapsed = _eval_point(tmp_path, suite, signal_before=False)
    assert suite.ran and elapsed < 10
    assert summary["eval"] == [(1, 2.5)] and "tasks" not in summary  # the eval loss is kept; no partial scores
    assert any("eval.tasks skipped" in line for line in lines)


def test_a_pending_signal_skips_the_suites(tmp_path):
    suite = SlowSuite(send_signal=False)
    summary, lines, elapsed = _eval_point(tmp_path, suite, signal_before=True)
    assert not suite.ran and elapsed < 10 and summary["eval"] == [(1, 2.5)]
    assert any("eval.tasks skipped" in line for line in lines)


def test_sft_exits_non_zero_after_a_stop_signal(capsys):
    """As `train` does: a scheduler requeues a job whose command exits non-zero."""
    from gigafactory.cli.train import train_and_report

    cfg = JobConfig()
    summary = {"interrupted": "SIGTERM", "end_step": 3, "eval": [], "checkpoint": "run/checkpoints/step-00000003"}
    trainer = SimpleNamespace(cfg=cfg, train=lambda: summary, close=lambda: None)
    assert train_and_report(trainer, "eval loss") == 128 + signal.SIGTERM
    assert "run the same command again to resume" in capsys.readouterr().out
