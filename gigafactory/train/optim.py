"""AdamW with decay on matrices only, and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from gigafactory.config.job import OptimizerConfig


def build_optimizer(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # Norm scales and the router stay undecayed: shrinking them changes what the model computes, not its capacity.
        (no_decay if p.ndim < 2 or "router" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The multi-tensor kernels cannot mix plain tensors and DTensors of different meshes (TP without FSDP, EP).
    uniform = len({p.device_mesh if isinstance(p, DTensor) else None for p in decay + no_decay}) == 1
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=None if uniform else False)


def lr_at(step: int, total_steps: int, cfg: OptimizerConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine down to lr * min_lr_ratio."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def clip_grad_norm_(params, max_norm: float, pp_group=None, exclude_from_norm: set[int] = frozenset()) -> torch.Tensor:
    """Global gradient L2 norm (clipped to max_norm if > 0), returned as a 0-dim tensor that is never read here:
    the scale min(1, max_norm / (norm + 1e-6)) is computed and applied on the device, so clipping costs no host
    sync (the trainer reads the norm once per step, batched with the loss). Works when parameters are DTensors on
    different meshes (FSDP-only and FSDP x TP parameters side by side), where torch's version cannot stack the
    norms, and across pipeline stages (pp_group). Parameters in exclude_from_norm (a tied weight's second copy) are
    clipped but not counted twice."""
    params = list(params)
    grads = [p.grad for p in params if p.grad is not None]
    squares = []
    for g in (p.grad for p in params if p.grad is not None and id(p) not in exclude_from_norm):
        norm = torch.linalg.vector_norm(g, dtype=torch.float32)
        squares.append((norm.full_tensor() if isinstance(norm, DTensor) else norm) ** 2)
    device = squares[0].device if squares else (params[0].device if params else None)
    total_sq = torch.stack(squares).sum() if squares else torch.zeros((), device=device)
    if pp_group is not None:  # each pipeline stage holds different parameters
        dist.all_reduce(total_sq, group=pp_group)
    total = total_sq.sqrt()
    if max_norm > 0 and grads:
        _scale_grads(grads, clip_scale(total, max_norm))
    return total


def clip_scale(total_norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """min(1, max_norm / (norm + 1e-6)) on the device (1 for a NaN norm: such gradients are left as they are, for
    the anomaly guard), in float64 then rounded to float32: the very number a Python-float scale would have
    multiplied the gradients by, so results stay bitwise those of a host-side version; a factor of exactly 1
    leaves unclipped gradients unchanged. (MPS has no float64: float32 there.)"""
    wide = torch.float32 if total_norm.device.type == "mps" else torch.float64
    return (max_norm / (total_norm.to(wide) + 1e-6)).nan_to_num(nan=1.0).clamp(max=1.0).float()


def _scale_grads(grads: list[torch.Tensor], scale: torch.Tensor) -> None:
    """g *= scale for every gradient, as mul_ by a Python float would. One kernel per gradient (not foreach: the
    gradients may be DTensors of different meshes); non-float32 ones (bf16) go through float32, because a tensor
    factor would first be rounded to their dtype."""
    for g in grads:
        if g.dtype == torch.float32:
            g.mul_(scale)
        else:
            g.copy_(g.float() * scale)
