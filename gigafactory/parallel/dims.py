"""ParallelDims: resolve and validate the parallel degrees, then build the one DeviceMesh every part uses.

Mesh axes, outermost first: pp, dp_replicate, dp_shard, ep, cp, tp (tp innermost so it stays inside one node's
NVLink domain). Validation runs before any process group exists, so a bad layout fails in milliseconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gigafactory.config.job import JobConfig
from gigafactory.models.config import ConfigError

AXES = ("pp", "dp_replicate", "dp_shard", "ep", "cp", "tp")


@dataclass(frozen=True)
class ParallelDims:
    pp: int
    dp_replicate: int
    dp_shard: int
    ep: int
    cp: int
    tp: int

    @property
    def world_size(self) -> int:
        return math.prod(self.degrees.values())

    @property
    def degrees(self) -> dict[str, int]:
        return {axis: getattr(self, axis) for axis in AXES}

    @property
    def dp(self) -> int:
        """Ranks that read different data: every axis but tp, pp and cp (those split one sample)."""
        return self.dp_replicate * self.dp_shard * self.ep

    @property
    def fsdp_enabled(self) -> bool:
        return self.dp_shard > 1 or self.dp_replicate > 1

    def build_mesh(self, device_type: str):
        from torch.distributed.device_mesh import init_device_mesh

        shape = tuple(self.degrees.values())
        return init_device_mesh(device_type, shape, mesh_dim_names=AXES)


def resolve_dims(cfg: JobConfig, world_size: int) -> ParallelDims:
    """Fill in a -1 degree from the world size and check the layout against the model; raise ConfigError if wrong."""
    p, m = cfg.parallel, cfg.model
    degrees = {axis: getattr(p, axis) for axis in AXES}
    unknown = [axis for axis, d in degrees.items() if d == -1]
    if len(unknown) > 1:
        raise ConfigError(f"parallel degrees {', '.join('parallel.' + a for a in unknown)} are all -1; infer at most one")
    known = math.prod(d for d in degrees.values() if d != -1)
    if unknown:
        if world_size % known:
            raise ConfigError(f"world size {world_size} is not divisible by the product {known} of the given parallel degrees; change them or the process count")
        degrees[unknown[0]] = world_size // known
    dims = ParallelDims(**degrees)
    if dims.world_size != world_size:
        layout = " x ".join(f"{a}={d}" for a, d in degrees.items() if d > 1) or "all 1"
        raise ConfigError(f"parallel layout {layout} needs {dims.world_size} processes but the world size is {world_size}; set one degree to -1 or match --nproc")
    if m.n_heads % dims.tp or m.n_kv_heads % dims.tp:
        raise ConfigError(f"parallel.tp={dims.tp} must divide model.n_heads={m.n_heads} and model.n_kv_heads={m.n_kv_heads}")
    if m.moe_ffn_dim % dims.tp:
        raise ConfigError(f"parallel.tp={dims.tp} must divide model.moe_ffn_dim={m.moe_ffn_dim}")
    if m.n_experts % dims.ep:
        raise ConfigError(f"parallel.ep={dims.ep} must divide model.n_experts={m.n_experts}")
    if m.n_layers < dims.pp:
        raise ConfigError(f"parallel.pp={dims.pp} exceeds model.n_layers={m.n_layers}; use at most one stage per layer")
    if cfg.data.seq_len % (2 * dims.cp) and dims.cp > 1:
        raise ConfigError(f"parallel.cp={dims.cp}: data.seq_len={cfg.data.seq_len} must be divisible by 2*cp for load-balanced causal attention")
    return dims
