"""The training step's host reads: one batched read per step, whatever the depth, and no op that syncs on a GPU.

On a CPU nothing syncs, so the reads are counted where they are asked for: a TorchFunctionMode records every
`.item()`, `.tolist()`, `float()/int()/bool()` of a tensor, `.cpu()`/`.numpy()` and the ops that read device data
to size their output on CUDA (bincount, nonzero, unique, boolean-mask indexing, repeat_interleave without
output_size), when called from gigafactory's own code (torch's internals, e.g. AdamW's CPU step counter, are not
the step's business).
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

import gigafactory
from gigafactory.train.host_reads import HOST_READS_PER_STEP, read_scalars, sum_on_device
from gigafactory.train.optim import clip_grad_norm_
from gigafactory.train.trainer import Trainer

PACKAGE = str(Path(gigafactory.__file__).parent)
TORCH = str(Path(torch.__file__).parent)
READS = {"item", "tolist", "__float__", "__int__", "__bool__", "__index__", "__format__", "cpu", "numpy"}
SHAPE_FROM_DATA = {"bincount", "nonzero", "argwhere", "unique", "unique_consecutive", "masked_select"}


class HostReads(TorchFunctionMode):
    """Counts host reads and data-dependent-shape ops issued by gigafactory code while active."""

    def __init__(self):
        super().__init__()
        self.reads: Counter = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        caller = sys._getframe(1)
        while caller is not None and caller.f_code.co_filename.startswith(TORCH) and name == "__format__":
            caller = caller.f_back  # f"{t:.3f}" enters through torch's Python wrappers
        where = caller.f_code.co_filename if caller is not None else ""
        if where.startswith(PACKAGE) and self._syncs(name, args, kwargs):
            self.reads[f"{name} at {Path(where).name}:{caller.f_lineno}"] += 1
        return func(*args, **kwargs)

    @staticmethod
    def _syncs(name: str, args, kwargs) -> bool:
        if name in READS or name in SHAPE_FROM_DATA:
            return True
        if name == "repeat_interleave":
            return kwargs.get("output_size") is None and (len(args) < 4 or args[3] is None)
        if name == "__getitem__":  # indexing with a boolean mask has a data-dependent shape
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index)
        return False

    def total(self) -> int:
        return sum(self.reads.values())


def reads_per_step(trainer: Trainer, steps: int = 1) -> tuple[float, Counter]:
    trainer.train_step()  # the first step may do one-time work
    with HostReads() as counter:
        for _ in range(steps):
            values = trainer.train_step()
            assert "loss" in values, values
    return counter.total() / steps, counter.reads


def test_a_training_step_reads_the_device_once_whatever_the_depth(tiny_job):
    counts = {}
    for n_layers in (2, 4):  # two microbatches per step: nothing per microbatch either
        trainer = Trainer(tiny_job(model__n_layers=n_layers, training__grad_accum_steps=2,
                                    training__batch_size=2, training__steps=10))
        counts[n_layers], where = reads_per_step(trainer)
        trainer.close()
        assert counts[n_layers] <= HOST_READS_PER_STEP, f"{counts[n_layers]} host reads per step; calls: {dict(where)}"
    assert counts[2] == counts[4], counts  # nothing per layer


def test_the_counter_sees_the_reads_it_is_meant_to_catch():
    from gigafactory.models.grok import moe

    t = torch.tensor([1.0, 2.0])
    with HostReads() as counter:
        read_scalars(t[0], t[1], 3.0)  # one batched transfer
        moe.per_expert_ffn(torch.ones(3, 4), torch.tensor([1, 2]), *(torch.ones(2, 4, 4),) * 2, torch.ones(2, 4, 4), torch.relu)
    assert counter.total() == 2, counter.reads  # read_scalars' tolist and the fallback loop's tolist


def test_reads_are_bitwise_the_host_arithmetic():
    losses = [torch.tensor(v, dtype=torch.float32) for v in (0.1, 2.7182817, 1e-7)]
    assert read_scalars(*losses) == [float(x) for x in losses]
    assert float(sum_on_device(losses)) == sum(float(x) for x in losses)
    assert sum_on_device([]) == 0


@pytest.mark.parametrize("max_norm", [0.0, 0.3, 1e9])
def test_device_side_clipping_is_bitwise_the_host_side_scale(max_norm):
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(n)) for n in (7, 33, 129)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    expected_grads = [p.grad.clone() for p in params]
    norm = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) ** 2 for g in expected_grads]).sum().sqrt()
    scale = max_norm / (float(norm) + 1e-6)  # the host-side version: a Python float
    if max_norm > 0 and scale < 1.0:
        for g in expected_grads:
            g.mul_(scale)
    with HostReads() as counter:
        total = clip_grad_norm_(params, max_norm)
    assert counter.total() == 0, counter.reads
    assert torch.equal(total, norm)
    assert all(torch.equal(p.grad, g) for p, g in zip(params, expected_grads))


def test_a_nan_norm_leaves_the_gradients_for_the_guard():
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([1.0, float("nan"), 2.0])
    assert torch.isnan(clip_grad_norm_([p], 1.0))
    assert p.grad[0] == 1.0 and p.grad[2] == 2.0
