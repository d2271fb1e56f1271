"""Pipeline parallel with torch.distributed.pipelining: split the model into stages and pick a schedule.

Each stage is a GrokModel with the other stages' layers deleted, so parameter names (and checkpoints) are the
same as the single-device model's. gpipe and 1f1b put one stage on each `pp` rank; interleaved_1f1b and
zero_bubble put two (rank r holds stages r and r + pp). With tied embeddings the first and last stages each hold
the embedding; their gradients are summed after backward (Megatron's embedding group).

Keyword arguments of schedule.step reach every stage's forward (torch passes them per microbatch to each stage), so
packed documents' positions and document ids travel with their microbatch; the last stage's loss can be replaced per
step (LastStageLoss) when it needs more than logits and next-token targets.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import (
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
)

from gigafactory.models import GrokModel
from gigafactory.models.config import ModelConfig
from gigafactory.parallel.distributed import sum_grads

SINGLE_STAGE = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}
MULTI_STAGE = {"interleaved_1f1b": ScheduleInterleaved1F1B, "zero_bubble": ScheduleInterleavedZeroBubble}


def stage_layers(n_layers: int, n_stages: int) -> list[list[int]]:
    """Contiguous layer ranges, as even as possible; earlier stages take the remainder."""
    base, extra = divmod(n_layers, n_stages)
    bounds, start = [], 0
    for s in range(n_stages):
        end = start + base + (1 if s < extra else 0)
        bounds.append(list(range(start, end)))
        start = end
    return bounds


def stages_per_rank(schedule: str) -> int:
    return 2 if schedule in MULTI_STAGE else 1


def build_stage_model(cfg: ModelConfig, stage_idx: int, n_stages: int) -> GrokModel:
    """On the meta device: the full model minus what this stage does not run."""
    with torch.device("meta"):
        model = GrokModel(cfg)
    keep = {str(i) for i in stage_layers(cfg.n_layers, n_stages)[stage_idx]}
    for name in list(model.layers.keys()):
        if name not in keep:
            del model.layers[name]
    is_first, is_last = stage_idx == 0, stage_idx == n_stages - 1
    if not is_last:
        model.norm, model.lm_head = None, None
    if not is_first and not (is_last and cfg.tie_embeddings):
        model.embed = None
    return model


def stage_indices(pp_rank: int, pp: int, schedule: str) -> list[int]:
    return [pp_rank + v * pp for v in range(stages_per_rank(schedule))]


class LastStageLoss:
    """The schedule's loss_fn. Pre-training uses the plain loss given at build time. A trainer whose loss needs
    more than logits and next-token targets (post-training: a weighting by the step's trained tokens, document ids,
    pair indices) passes its own for the step: schedule.step(..., target=T, loss_kwargs={"loss": fn}). T is one
    tensor split along dim 0 with the microbatches (pack what each microbatch needs into it), and
    fn(logits, T_microbatch, inferring) -> loss, where `inferring` is True while torch runs a stage on
    placeholder inputs to learn shapes (a loss with side effects, such as logged statistics, skips them then)."""

    def __init__(self, plain):
        self.plain, self.inferring = plain, False

    def __call__(self, output, target, loss=None):
        return self.plain(output, target) if loss is None else loss(output, target, self.inferring)


def build_schedule(stage_models: list[GrokModel], indices: list[int], n_stages: int, pp_group, device, schedule: str, n_microbatches: int, loss_fn):
    stages = [PipelineStage(m, i, n_stages, device, group=pp_group) for m, i in zip(stage_models, indices)]
    loss_fn = LastStageLoss(loss_fn)
    for stage, model in zip(stages, stage_models):
        _pause_balance_stats_in_metadata_inference(stage, model, loss_fn)
    if schedule in SINGLE_STAGE:
        return SINGLE_STAGE[schedule](stages[0], n_microbatches=n_microbatches, loss_fn=loss_fn)
    return MULTI_STAGE[schedule](stages, n_microbatches=n_microbatches, loss_fn=loss_fn)


def _pause_balance_stats_in_metadata_inference(stage: PipelineStage, model: GrokModel, loss: LastStageLoss) -> None:
    """On its first step a stage runs forward (and backward) once on the first microbatch or on empty tensors to
    learn shapes; those are not training tokens, so the router balance statistics (models/grok/moe.py) skip them,
    and the loss is told (LastStageLoss.inferring).
    The method names are torch's (2.13: *_metadata_inference; earlier: _shape_inference); the layout tests'
    pipeline parity with the balance loss on fails if a torch version renames them."""
    stats = [moe.balance for moe in model.moe_layers()]
    for name in ("_forward_metadata_inference", "_backward_metadata_inference", "_shape_inference"):
        method = getattr(stage, name, None)
        if method is None:
            continue

        def paused(*args, _method=method, **kwargs):
            for s in stats:
                s.paused = True
            loss.inferring = True
            try:
                return _method(*args, **kwargs)
            finally:
                loss.inferring = False
                for s in stats:
                    s.paused = False

        setattr(stage, name, paused)


class TiedEmbeddingSync:
    """Sums the embedding gradient of the first and last stage (they hold one tied weight between them)."""

    def __init__(self, world_mesh, stage_models: list[GrokModel]):
        self.group = None
        # Every rank creates the group of every (first, last) pair, in the same order, and keeps its own.
        grid = world_mesh.mesh.reshape(world_mesh.mesh.shape[0], -1)  # [pp, other ranks]; pp is the outermost axis
        for col in range(grid.shape[1]):
            ranks = sorted({int(grid[0, col]), int(grid[-1, col])})
            group = dist.new_group(ranks)
            if dist.get_rank() in ranks:
                self.group = group
        self.weights = [m.embed.weight for m in stage_models if m.embed is not None]

    def __call__(self) -> None:
        sum_grads(self.weights, self.group)
