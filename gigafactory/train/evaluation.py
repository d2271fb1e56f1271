"""Task suites scored during training (the [eval] config section), beside training.eval_every's held-out loss.

The suites themselves (the KJV task, lm-eval harness tasks) live in posttrain/, which sits above train/: the command
that builds the trainer hands it a TaskSuites (posttrain/eval_suites.py), and this module only decides when they run,
on which module, and where their numbers go: metrics.jsonl / TensorBoard as eval/<suite>/<score>, the run's summary,
and RUN/eval-step-N.json + .md in the shape `gigafactory eval` writes.

Every rank runs every suite on the same items, in lockstep: under FSDP/HSDP each forward gathers parameters from
all data ranks, and under expert parallel each one dispatches tokens to every rank's experts, so no rank may skip
one. The results are then the same on every rank; rank 0 logs and writes them. Layouts whose forward is not one
call on whole sequences (tensor+sequence, pipeline, context parallel) are refused up front (check_task_layout).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn

from gigafactory.config.job import JobConfig
from gigafactory.errors import UserError

# Why a layout cannot run the suites yet: each needs the model as one module giving whole-sequence logits per rank.
_UNSUPPORTED = {
    "tp": "sequence parallel leaves each rank a slice of the sequence's logits, and exact match's KV cache is not split by heads",
    "pp": "a forward is a pipeline schedule across the stages, which the suites' single forwards do not drive",
    "cp": "each rank holds a slice of every sequence",
}


@dataclass
class SuiteResult:
    section: str  # its key in the eval JSON, as `gigafactory eval` names it ("kjv_task", "harness")
    result: dict  # that section's content
    scores: dict[str, float]  # headline numbers, logged as eval/<suite name>/<score>


class TaskSuite(Protocol):
    name: str  # as in eval.tasks: "kjv", "harness:<task>"

    def run(self, model: nn.Module) -> SuiteResult: ...


@dataclass
class TaskSuites:
    """What the trainer's builder hands it: the suites of eval.tasks and the writer of `gigafactory eval`'s JSON +
    table (result dict, JSON path)."""

    suites: list[TaskSuite]
    write: Callable[[dict, Path], object]


def check_task_layout(cfg: JobConfig, dims) -> None:
    """Refuse, in one line, a layout the suites cannot run under (before any process or model is built)."""
    if not cfg.eval.tasks:
        return
    for axis, why in _UNSUPPORTED.items():
        if dims.degrees[axis] > 1:
            raise UserError(f"eval.tasks with parallel.{axis}={dims.degrees[axis]} is not supported yet ({why}); "
                            "run them with data-parallel/FSDP/expert-parallel layouts, or afterwards with `gigafactory eval`")


def tasks_due(cfg: JobConfig, step: int) -> bool:
    """The suites run at the eval points whose step is a multiple of training.eval_every x eval.every (step 0's
    included), and at the last step's: fixed steps, so a resumed run scores the same steps as a straight one."""
    return bool(cfg.eval.tasks) and (step % (cfg.training.eval_every * cfg.eval.every) == 0 or step == cfg.training.steps)


@torch.no_grad()
def run_task_suites(suites: TaskSuites, model: nn.Module, step: int, eval_loss: float, run_dir: Path, rank: int) -> dict[str, float]:
    """Score every suite on `model` (switched to eval mode for the length of it, as the eval loss does; no autocast,
    so the numbers are `gigafactory eval`'s on this step's weights); rank 0 writes RUN/eval-step-N.json + .md.
    Returns the scores to log, named eval/<suite>/<score>."""
    was_training = model.training
    model.eval()
    try:
        results = [(suite.name, suite.run(model)) for suite in suites.suites]
    finally:
        model.train(was_training)
    report: dict = {"checkpoint": f"{run_dir} at step {step} (during training)", "step": step, "eval_loss": eval_loss}
    scores: dict[str, float] = {}
    for name, res in results:
        report[res.section] = {**report[res.section], **res.result} if isinstance(report.get(res.section), dict) else res.result
        scores.update({f"eval/{name}/{key}": float(value) for key, value in res.scores.items()})
    if rank == 0:
        suites.write(report, run_dir / f"eval-step-{step}.json")
    return scores


def eval_point(trainer, metrics, progress, summary: dict) -> None:
    """One eval point of the training loop: training.eval_every's held-out loss and, when due, eval.tasks' suites on
    the trainer's model, all with the watchdog paused (they take longer than a step); logged to metrics.jsonl /
    TensorBoard, printed, and kept in the run's summary ("eval": (step, loss), "tasks": (step, scores)).
    A stop signal (SIGTERM, Ctrl-C) skips the suites, or on one process cuts them short: they could outlast
    resilience.term_grace_s, which would exit without the final save."""
    step = trainer.step
    due = tasks_due(trainer.cfg, step)
    if due and trainer.task_suites is None:
        raise UserError("eval.tasks is set but this trainer was given no suites: the command that builds it attaches "
                        "them (posttrain/eval_suites.attach_task_suites)")
    skipped = f"step {step}: eval.tasks skipped (stopping: saving first; `gigafactory eval --checkpoint RUN` scores the saved checkpoint)"
    if due and trainer.signals.requested(trainer.device):  # agreed by every rank: the suites run in lockstep
        due = False
        progress.print(skipped)
    scores = {}
    with trainer.watchdog.paused():
        loss = trainer.evaluate()
        if due:
            try:
                with stop_cuts_suites():
                    scores = run_task_suites(trainer.task_suites, trainer.pmodel.parts[0], step, loss, trainer.run_dir, trainer.rank)
            except SuitesCut:
                progress.print(skipped)
    summary["eval"].append((step, loss))
    if scores:
        summary.setdefault("tasks", []).append((step, scores))
    metrics.log(step, {"eval_loss": loss, **scores})
    progress.print(f"step {step}: eval loss {loss:.4f}{brief(scores)}")


class SuitesCut(Exception):
    """A stop signal arrived while the suites ran on one process."""


@contextmanager
def stop_cuts_suites():
    """On one process, a stop signal during the suites is handled as usual (the trainer's handler notes it, starts the
    grace timer) and then ends the suites at once. Several ranks run them in lockstep, through collectives, so one rank
    may not leave alone: there they finish, and the loop stops after them."""
    several = dist.is_initialized() and dist.get_world_size() > 1
    if several or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def cut(signum, frame):
        handler = previous[signum]
        if callable(handler):
            handler(signum, frame)
        raise SuitesCut

    for sig in previous:
        signal.signal(sig, cut)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def brief(scores: dict[str, float], limit: int = 4) -> str:
    """A few scores for the progress line ("kjv/answer_loglik -3.21 | ...")."""
    return "".join(f" | {key.removeprefix('eval/')} {value:.4g}" for key, value in list(scores.items())[:limit])


def summary_lines(history: list[tuple[int, dict[str, float]]]) -> list[str]:
    """Each score's first and last value over the run (printed by the training commands on rank 0)."""
    if not history:
        return []
    (first_step, first), (last_step, last) = history[0], history[-1]
    return [f"{key}: {first[key]:.4f} at step {first_step} -> {value:.4f} at step {last_step}" if key in first
            else f"{key}: {value:.4f} at step {last_step}" for key, value in last.items()]
