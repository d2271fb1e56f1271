"""LoRA (Hu et al. 2021): low-rank adapters beside frozen linear weights, y = W x + (alpha / r) * B A x.

The adapters live outside the model (in a LoRA module whose forward hooks add B A x to each target linear's output),
so the model's parameters and names stay those of the checkpoint it was loaded from. A starts random and B at 0, so
the adapted model computes exactly the base model's function at step 0. `merged()` folds (alpha / r) B A into W for
the length of a save: a LoRA run's checkpoints are ordinary checkpoints that generate, serve and export load
unchanged, and the live weights go back to the frozen base afterwards (restored from a copy, bit for bit).
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from gigafactory.errors import UserError
from gigafactory.posttrain.options import LoRAOptions


class LoRA(nn.Module):
    """Adapters for every nn.Linear of `model` whose last name part is in opts.targets; freezes the whole model."""

    def __init__(self, model: nn.Module, opts: LoRAOptions, seed: int = 0):
        super().__init__()
        opts.validate()
        self.scale, self.rank = opts.alpha / opts.rank, opts.rank
        targets = set(opts.target_names())
        self.linears = {name: mod for name, mod in model.named_modules() if isinstance(mod, nn.Linear) and name.rpartition(".")[2] in targets}
        if not self.linears:
            names = sorted({n.rpartition(".")[2] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
            raise UserError(f"--lora.targets {opts.targets!r} matches no linear layer of this model; its linear layers are: {', '.join(names)}")
        for p in model.parameters():
            p.requires_grad_(False)
        self.A, self.B = nn.ParameterDict(), nn.ParameterDict()
        generator = torch.Generator().manual_seed(seed)
        for name, mod in self.linears.items():
            key = name.replace(".", "__")
            weight = mod.weight
            a = torch.empty(opts.rank, weight.shape[1], dtype=torch.float32)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)  # as nn.Linear's own init (and peft's)
            self.A[key] = nn.Parameter(a.to(weight.device, weight.dtype))  # the base's (master) dtype
            self.B[key] = nn.Parameter(torch.zeros(weight.shape[0], opts.rank, device=weight.device, dtype=weight.dtype))
            mod.register_forward_hook(self._hook(key))
        self.merged_now = False

    def _hook(self, key: str):
        def add_adapter(module, inputs, out):
            if self.merged_now:
                return out
            x = inputs[0]
            return out + self.scale * F.linear(F.linear(x, self.A[key].to(x.dtype)), self.B[key].to(x.dtype))
        return add_adapter

    def delta(self, key: str) -> torch.Tensor:
        return self.scale * (self.B[key] @ self.A[key])

    @contextmanager
    def merged(self):
        """Inside: each target weight is W + (alpha / r) B A and the hooks add nothing (the model computes the same
        function in one matmul per layer); after: W is the frozen base again, exactly."""
        with torch.no_grad():
            saved = {name: mod.weight.detach().clone() for name, mod in self.linears.items()}
            for name, mod in self.linears.items():
                mod.weight.add_(self.delta(name.replace(".", "__")).to(mod.weight.dtype))
        self.merged_now = True
        try:
            yield
        finally:
            self.merged_now = False
            with torch.no_grad():
                for name, mod in self.linears.items():
                    mod.weight.copy_(saved[name])

    @torch.no_grad()
    def restart(self, seed: int) -> None:
        """Fresh adapters (B = 0, A redrawn) over the current weights, as after a resume from merged weights."""
        generator = torch.Generator().manual_seed(seed)
        for key in self.A:
            a = torch.empty(self.A[key].shape, dtype=torch.float32)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
            self.A[key].copy_(a)
            self.B[key].zero_()
