"""LoRA (Hu et al. 2021): low-rank adapters beside frozen weights, y = W x + (alpha / r) * B A x, in every layout.

The adapters live outside the model (this module), so the model's parameters and names stay those of the checkpoint
it was loaded from, and a frozen base gives FSDP2 nothing to allocate or reduce (its unsharded parameters inherit
requires_grad=False, so no gradient exists for them). Targets are matched by the last part of a name:
- an nn.Linear: a forward hook adds (alpha / r) B A x to its output;
- MoE experts (models/grok/moe.py keeps E experts as 3-D [E, in, out] weights run by grouped GEMMs): per-expert
  A_e [in, r] and B_e [r, out], added inside the expert computation through Experts.low_rank, as two more grouped
  GEMMs over the same expert-sorted rows. Not a weight parametrization: W + A B per forward would build an
  expert-weight-sized tensor per projection and keep it for backward, where the low-rank path costs 2 r / out of a
  projection's FLOPs and no weight-sized memory.
A starts random and B at 0, so the adapted model computes exactly the base model's function at step 0. `merged()`
folds the delta into the weights for the length of a save: a LoRA run's checkpoints are ordinary checkpoints that
generate, serve and export load unchanged; the live weights go back to the frozen base afterwards, bit for bit.

Layouts. Each factor is drawn whole (seeded by the run's seed and the weight's name, so as on one process) and
each rank keeps the slice its layout needs: the factor on a tensor-parallel-sharded side of W is sharded the same way (B for a column-parallel
linear or the experts' F outputs, A for a row-parallel one), the other is replicated; under expert parallel each
rank holds its own experts' A_e and B_e. `sync_grads()` after backward makes the gradients those of one process:
a replicated factor whose gradient is partial over tp (it multiplies a sharded one) is summed over tp, then every
gradient is averaged over the ranks that saw different tokens, as FSDP averages the model's (expert adapters: over
the non-ep data ranks, divided by ep as well, as parallel/expert_parallel.ExpertGradScale does for experts) and
over a pipeline's microbatches. `merged()` adds each rank's piece of the whole delta to its piece of W, whatever
DTensor layout holds it (TP, EP, FSDP/HSDP or several).
"""

from __future__ import annotations

import math
import zlib
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Partial

from gigafactory.errors import UserError
from gigafactory.models.grok.model import plain_name
from gigafactory.models.grok.moe import Experts, grouped_matmul
from gigafactory.posttrain.lora_layout import Factor, Layout, local_piece, sum_over_tp
from gigafactory.posttrain.options import LoRAOptions

EXPERT_WEIGHTS = ("w_gate", "w_up", "w_down")


@dataclass
class Target:
    """One adapted weight: a linear's W [out, in] += B [out, r] A [r, in], or experts' W [E, in, out] += A [E, in, r]
    B [E, r, out]. shard_a / shard_b: the (dim, mesh axis) chunks this rank holds of each factor; partial: the factor
    ("A", "B" or "") whose gradient each tp rank holds a part of; sum_h: a row-parallel linear, whose A x is a
    partial sum over tp."""

    name: str  # the weight's parameter name in the model
    module: nn.Module
    param: str
    experts: bool
    shard_a: tuple = ()
    shard_b: tuple = ()
    partial: str = ""
    sum_h: bool = False

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self.module, self.param)


OTHER_STAGE_NAMES = {"lm_head"}  # under pipeline parallel only the last stage holds it: valid where it is absent


class LoRA(nn.Module):
    """Adapters for every target of `model` named in opts.targets (nn.Linear layers and MoE expert weights); freezes
    the whole model. `mesh`: the trainer's DeviceMesh (None on one process). Build it before the model's first
    forward: FSDP2 creates its unsharded parameters then, with the requires_grad they have at that time."""

    def __init__(self, model: nn.Module, opts: LoRAOptions, seed: int = 0, mesh=None, sequence_parallel: bool = False):
        super().__init__()
        opts.validate()
        self.scale, self.rank = opts.alpha / opts.rank, opts.rank
        self.layout = Layout(mesh, sequence_parallel)
        self.targets = self._find_targets(model, set(opts.target_names()), opts.targets)
        self._check_rank()
        for p in model.parameters():
            p.requires_grad_(False)
        self.A, self.B = nn.ParameterDict(), nn.ParameterDict()
        for key, (a, b) in self._draw(seed).items():
            self.A[key], self.B[key] = nn.Parameter(a), nn.Parameter(b)
        self.factors = [Factor(self.A[k], t.shard_a, t.partial == "A", t.experts) for k, t in self.targets.items()] + \
                       [Factor(self.B[k], t.shard_b, t.partial == "B", t.experts) for k, t in self.targets.items()]
        self.merged_now = False
        expert_keys: dict[nn.Module, dict[str, str]] = {}
        for key, t in self.targets.items():
            if t.experts:
                expert_keys.setdefault(t.module, {})[t.param] = key
            else:
                t.module.register_forward_hook(self._linear_hook(key, t))
        for module, keys in expert_keys.items():
            module.low_rank = self._expert_term(keys)

    # ---- targets -------------------------------------------------------------------------------------------------
    def _find_targets(self, model: nn.Module, names: set[str], spec: str) -> dict[str, Target]:
        targets, found = {}, set()
        for name, mod in model.named_modules():
            name = plain_name(name)
            if isinstance(mod, nn.Linear):
                found.add(name.rpartition(".")[2])
                if name.rpartition(".")[2] in names:
                    targets[name.replace(".", "__")] = self._linear_target(f"{name}.weight", mod)
            elif isinstance(mod, Experts):
                found.update(f"{w} (experts)" for w in EXPERT_WEIGHTS)
                for param in EXPERT_WEIGHTS:
                    if param in names:
                        targets[f"{name}.{param}".replace(".", "__")] = self._expert_target(f"{name}.{param}", mod, param)
        if not targets:
            raise UserError(f"--lora.targets {spec!r} matches no layer of this model; its linear layers and expert "
                            f"weights are: {', '.join(sorted(found))}")
        unknown = sorted(names - {f.removesuffix(" (experts)") for f in found} - OTHER_STAGE_NAMES)
        if unknown:  # a typo beside a valid name would otherwise leave that layer frozen without a word
            raise UserError(f"--lora.targets names {', '.join(unknown)}, which this model does not have; its linear layers "
                            f"and expert weights are: {', '.join(sorted(found))}")
        return targets

    def _check_rank(self) -> None:
        """A rank above a weight's smaller side adds no expressiveness, only memory (10^5 would exhaust the host)."""
        sides = {t.name: min(t.weight.shape[1:] if t.experts else t.weight.shape) for t in self.targets.values()}
        name = min(sides, key=sides.get)
        if self.rank > sides[name]:
            raise UserError(f"--lora.rank {self.rank} exceeds the smaller side of {name} ({sides[name]}); "
                            f"pass a rank <= {sides[name]} (8-64 is usual), or fine-tune every weight with --lora.rank 0")

    def _linear_target(self, name: str, mod: nn.Linear) -> Target:
        tp_dim = self.layout.shard_dim(mod.weight, "tp")
        if tp_dim == 0:  # column parallel: B keeps this rank's output rows; A's gradient sums over the rows' ranks
            return Target(name, mod, "weight", False, shard_b=((0, "tp"),), partial="A")
        if tp_dim == 1:  # row parallel: A keeps this rank's input columns; A x is summed over tp before B
            # B's gradient is whole on every tp rank, except under sequence parallel (each rank's slice of tokens)
            partial = "B" if self.layout.sequence_parallel else ""
            return Target(name, mod, "weight", False, shard_a=((1, "tp"),), sum_h=True, partial=partial)
        return Target(name, mod, "weight", False)

    def _expert_target(self, name: str, mod: Experts, param: str) -> Target:
        weight = getattr(mod, param)
        by_expert = ((0, "ep"),) if self.layout.shard_dim(weight, "ep") == 0 else ()  # this rank's experts only
        tp_dim = self.layout.shard_dim(weight, "tp")
        if tp_dim == 2:  # w_gate / w_up: F outputs split over tp
            return Target(name, mod, param, True, shard_a=by_expert, shard_b=by_expert + ((2, "tp"),), partial="A")
        if tp_dim == 1:  # w_down: F inputs split; its partial output is summed by the experts' own reduction
            return Target(name, mod, param, True, shard_a=by_expert + ((1, "tp"),), shard_b=by_expert, partial="B")
        return Target(name, mod, param, True, shard_a=by_expert, shard_b=by_expert)

    def _draw(self, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Each target's (A, B) slices, drawn whole from a generator seeded by `seed` and the weight's name, so
        every layout draws the one-process values whichever targets a rank holds (a pipeline stage holds some): A
        uniform in +-1/sqrt(fan_in) (nn.Linear's own init, and peft's), B zero."""
        out = {}
        for key, t in self.targets.items():
            generator = torch.Generator().manual_seed((seed << 32 | zlib.crc32(t.name.encode())) % 2**63)
            w = t.weight
            if t.experts:  # [E, in, out]
                fan_in, a_shape, b_shape = w.shape[1], (w.shape[0], w.shape[1], self.rank), (w.shape[0], self.rank, w.shape[2])
            else:  # [out, in]
                fan_in, a_shape, b_shape = w.shape[1], (self.rank, w.shape[1]), (w.shape[0], self.rank)
            bound = 1 / math.sqrt(fan_in)
            a = torch.empty(a_shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
            a = self.layout.slice(a, t.shard_a).to(w.device, w.dtype)  # the base's (master) dtype
            out[key] = (a, self.layout.slice(torch.zeros(b_shape, dtype=w.dtype), t.shard_b).to(w.device))
        return out

    # ---- forward -------------------------------------------------------------------------------------------------
    def _linear_hook(self, key: str, t: Target):
        def add_adapter(module, inputs, out):
            if self.merged_now:
                return out
            x = inputs[0]
            if isinstance(x, DTensor):  # tensor parallel: replicated (column) or split by features (row)
                x = x.to_local(grad_placements=(Partial(),) * x.device_mesh.ndim) if t.partial == "A" else x.to_local()
            h = F.linear(x, self.A[key].to(x.dtype))
            if t.sum_h:
                h = sum_over_tp(h, self.layout.group("tp"), self.layout.sequence_parallel)
            return out + self.scale * F.linear(h, self.B[key].to(x.dtype))
        return add_adapter

    def _expert_term(self, keys: dict[str, str]):
        """Experts.low_rank: (alpha / r) x A_e B_e for each row's expert e, as two grouped GEMMs."""
        def low_rank(param: str, x_NI: torch.Tensor, tokens_per_expert_E: torch.Tensor):
            key = keys.get(param)
            if key is None or self.merged_now:
                return None
            h_NR = grouped_matmul(x_NI, self.A[key].to(x_NI.dtype), tokens_per_expert_E)
            return self.scale * grouped_matmul(h_NR, self.B[key].to(x_NI.dtype), tokens_per_expert_E)
        return low_rank

    # ---- training ------------------------------------------------------------------------------------------------
    def sync_grads(self, microbatches: int = 1) -> None:
        """After backward: the gradients one process would have (see lora_layout.Layout.sync_grads)."""
        self.layout.sync_grads(self.factors, microbatches)

    def clip_grads(self, max_norm: float) -> torch.Tensor:
        return self.layout.clip_grads(self.factors, max_norm)

    # ---- merging -------------------------------------------------------------------------------------------------
    def delta(self, key: str) -> torch.Tensor:
        """(alpha / r) B A of one target, whole-weight shaped (a collective when its factors are sharded)."""
        t = self.targets[key]
        a, b = self.layout.gather(self.A[key], t.shard_a), self.layout.gather(self.B[key], t.shard_b)
        return self.scale * (a @ b if t.experts else b @ a)

    @contextmanager
    def merged(self):
        """Inside: each target weight is W + (alpha / r) B A and the adapters add nothing (the model computes the same
        function without them); after: W is the frozen base again, exactly. Collective in a parallel layout."""
        saved = {}
        with torch.no_grad():
            for key, t in self.targets.items():
                local = _local(t.weight)
                saved[key] = local.clone()
                local.add_(local_piece(self.delta(key), t.weight).to(local.dtype))
        self.merged_now = True
        try:
            yield
        finally:
            self.merged_now = False
            with torch.no_grad():
                for key, t in self.targets.items():
                    _local(t.weight).copy_(saved[key])

    @torch.no_grad()
    def restart(self, seed: int) -> None:
        """Fresh adapters (B = 0, A redrawn) over the current weights, as after a resume from merged weights."""
        for key, (a, b) in self._draw(seed).items():
            self.A[key].copy_(a)
            self.B[key].copy_(b)


def _local(w: torch.Tensor) -> torch.Tensor:
    return w.to_local() if isinstance(w, DTensor) else w
