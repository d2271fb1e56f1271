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
    """Global gradient L2 norm (clipped to max_norm if > 0). Works when parameters are DTensors on different
    meshes (FSDP-only and FSDP x TP parameters side by side), where torch's version cannot stack the norms, and
    across pipeline stages (pp_group). Parameters in exclude_from_norm (a tied weight's second copy) are clipped
    but not counted twice."""
    grads = [p.grad for p in params if p.grad is not None]
    squares = []
    for g in (p.grad for p in params if p.grad is not None and id(p) not in exclude_from_norm):
        norm = torch.linalg.vector_norm(g, dtype=torch.float32)
        squares.append((norm.full_tensor() if isinstance(norm, DTensor) else norm) ** 2)
    total_sq = torch.stack(squares).sum() if squares else torch.zeros(())
    if pp_group is not None:  # each pipeline stage holds different parameters
        dist.all_reduce(total_sq, group=pp_group)
    total = total_sq.sqrt()
    scale = max_norm / (float(total) + 1e-6)
    if max_norm > 0 and scale < 1.0:
        for g in grads:
            g.mul_(scale)
    return total
