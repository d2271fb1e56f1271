"""Pipeline stages and schedules: which layers each stage holds, and how long m microbatches take through them.

Stages need not hold equal layer counts: the last stage also runs the output head and loss, so the planner gives
it fewer layers (and the first stage, which holds the most in-flight activations, the fewest of the rest), as
Llama 3's 405B run did. A step on p stages with per-microbatch stage times t_i (forward + backward, exposed
communication included) is:

  1f1b, gpipe       (m - 1) * max t + sum t            the first microbatch crosses every stage, the rest queue
  interleaved_1f1b  m * max t + (sum t - max t) / v    v chunks per rank shrink the fill/drain (needs m % p = 0;
                    chunks may differ by a layer)
  zero_bubble       1f1b - (p - 1) * W * (1 + min(1, (m - 1) / (p - 1)))
                    weight gradients W fill the drain (ZB-H1, Qi et al. 2024): (p-1)(F+B-2W) with m >= p
                    microbatches; one microbatch only moves one W per stage off the critical path
  dualpipe          m * max t + (p/2 - 1) * (F + 2B - 3W)   (DeepSeek-V3 report, Table 2; F&B taken as F + B)
                    two copies of each stage's weights, p + 1 in-flight microbatches; needs p and m even, m >= p
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from gigafactory.errors import UserError
from gigafactory.plan.layout import Layout


@dataclass(frozen=True)
class StageTimes:
    """Seconds per microbatch of each stage: forward, backward (all of it) and its weight-gradient part."""

    fwd: tuple[float, ...]
    bwd: tuple[float, ...]
    wgrad: tuple[float, ...]

    @property
    def total(self) -> tuple[float, ...]:
        return tuple(f + b for f, b in zip(self.fwd, self.bwd))

    def slowest(self) -> int:
        totals = self.total
        return totals.index(max(totals))


def balanced_stages(n_layers: int, pp: int, t_layer: float, t_head: float) -> tuple[int, ...]:
    """Layer counts per stage minimising the slowest stage when the last also runs the head (t_head seconds)."""
    if pp == 1:
        return (n_layers,)
    return _balanced(n_layers, pp, round(t_head / t_layer, 3) if t_layer > 0 else 0.0)


@lru_cache(maxsize=4096)
def _balanced(n_layers: int, pp: int, head_in_layers: float) -> tuple[int, ...]:
    t_layer, t_head = 1.0, head_in_layers
    best = None
    for k in range(math.ceil(n_layers / pp), n_layers + 1):  # k: most layers on any stage but the last
        last = max(1, n_layers - (pp - 1) * k)
        rest = n_layers - last
        if rest < pp - 1:
            break
        slowest = max(math.ceil(rest / (pp - 1)) * t_layer, last * t_layer + t_head)
        if best is None or slowest < best[0] - 1e-15:
            best = (slowest, last, rest)
    _, last, rest = best
    base, extra = divmod(rest, pp - 1)
    # the stages after the first take the extra layers: the first holds the most in-flight microbatches
    firsts = [base + (1 if i >= pp - 1 - extra else 0) for i in range(pp - 1)]
    return (*firsts, last)


def check_stages(lay: Layout, n_layers: int) -> None:
    """One-line UserError when the layout's explicit stage split cannot run the model."""
    if not lay.stage_layers:
        return
    if len(lay.stage_layers) != lay.pp:
        raise UserError(f"stage_layers has {len(lay.stage_layers)} entries but pp={lay.pp}; give one layer count per stage")
    if any(n < 1 for n in lay.stage_layers) or sum(lay.stage_layers) != n_layers:
        raise UserError(f"stage_layers {'+'.join(map(str, lay.stage_layers))} must be positive and add up to the model's {n_layers} layers")


def check_schedule(lay: Layout, n_layers: int) -> None:
    """One-line UserError for a schedule the pipeline shape cannot run."""
    p, m = lay.pp, lay.microbatches
    if lay.schedule == "interleaved_1f1b":
        if p == 1 or lay.virtual_stages < 2:
            raise UserError("interleaved_1f1b needs pp > 1 and virtual_stages >= 2")
        if m % p:
            raise UserError(f"interleaved_1f1b needs microbatches ({m}) to be a multiple of pp ({p})")
        fewest = min(lay.stage_layers) if lay.stage_layers else n_layers // p
        if fewest < lay.virtual_stages:
            raise UserError(f"interleaved_1f1b with v={lay.virtual_stages} needs at least v layers on every stage (fewest: {fewest})")
    if lay.schedule == "dualpipe" and (p % 2 or m % 2 or m < p):
        raise UserError(f"dualpipe needs an even pp ({p}) and an even number of microbatches >= pp ({m})")


def pipeline_time(lay: Layout, st: StageTimes) -> float:
    """Seconds for the step's m microbatches through the stages (gradient sync and optimizer excluded)."""
    t = st.total
    p, m = lay.pp, lay.microbatches
    t_max, t_sum = max(t), sum(t)
    if p == 1:
        return m * t_max
    w_avg = sum(st.wgrad) / p
    if lay.schedule == "interleaved_1f1b":
        return m * t_max + (t_sum - t_max) / lay.virtual_stages
    if lay.schedule == "dualpipe":
        f_avg, b_avg = sum(st.fwd) / p, sum(st.bwd) / p
        return m * t_max + max(0.0, (p / 2 - 1) * (f_avg + 2 * b_avg - 3 * w_avg))
    one_f_one_b = (m - 1) * t_max + t_sum
    if lay.schedule == "zero_bubble":
        moved = (p - 1) * w_avg * (1 + min(1.0, (m - 1) / (p - 1)))
        return max(m * t_max, one_f_one_b - moved)
    return one_f_one_b


def in_flight(lay: Layout, stage: int) -> float:
    """Microbatches whose activations `stage` holds at its peak, in units of its own layers."""
    m, p, v = lay.microbatches, lay.pp, lay.virtual_stages
    if p == 1:
        return 1.0
    if lay.schedule == "gpipe":
        return float(m)
    if lay.schedule == "interleaved_1f1b":
        return min(m, p - stage) * (1 + (p - 1) / (p * v))
    if lay.schedule == "dualpipe":
        return float(min(m, p + 1))
    return float(min(m, p - stage))  # 1f1b and zero_bubble (ZB-H1 keeps 1F1B's peak)
