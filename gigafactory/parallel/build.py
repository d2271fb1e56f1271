"""Build the training model for a layout: meta-device model(s) -> parallelisms -> materialise -> identical init.

Returns a ParallelModel: the stage modules this rank runs, one `view` module whose parameter names are those of
the single-device model (for the optimizer and checkpoints, whatever the layout), and the pipeline schedule if any.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from gigafactory.config.job import JobConfig
from gigafactory.errors import UserError
from gigafactory.models import GrokModel
from gigafactory.models.float8 import convert_to_float8
from gigafactory.parallel import pipeline
from gigafactory.parallel.balance import global_microbatches, setup_balance_stats
from gigafactory.parallel.dims import ParallelDims
from gigafactory.parallel.expert_parallel import ExpertGradScale
from gigafactory.parallel.parallelize import _unwrap, parallelize
from gigafactory.parallel.sequence_parallel import ReplicatedGradSync


@dataclass
class ParallelModel:
    parts: list[GrokModel]
    view: nn.Module
    schedule: object | None = None
    is_first_stage: bool = True
    is_last_stage: bool = True
    after_backward: list = field(default_factory=list)

    def moe_layers(self):
        return [m for part in self.parts for m in part.moe_layers()]


def _view(parts: list[GrokModel]) -> nn.Module:
    """A module sharing the parts' submodules under the single-device names (layers.N, embed, norm, lm_head)."""
    if len(parts) == 1 and parts[0].norm is not None and parts[0].embed is not None:
        return parts[0]
    view = nn.Module()
    view.layers = nn.ModuleDict({k: v for part in parts for k, v in part.layers.items()})
    for name in ("embed", "norm", "lm_head"):
        owner = next((getattr(p, name) for p in parts if getattr(p, name) is not None), None)
        if owner is not None:
            setattr(view, name, owner)
    return view


def sequence_parallel(cfg: JobConfig, dims: ParallelDims) -> bool:
    return cfg.parallel.sequence_parallel and dims.tp > 1


def check_supported(cfg: JobConfig, dims: ParallelDims) -> None:
    """Layouts whose combination is not built (yet) are refused up front with the reason."""
    if dims.ep > 1 and dims.tp > 1:
        raise UserError(f"parallel.ep={dims.ep} with parallel.tp={dims.tp}: expert and tensor parallel together are not supported; use one of them")
    if sequence_parallel(cfg, dims) and (dims.pp > 1 or dims.cp > 1 or cfg.model.dense_ffn_dim):
        raise UserError("parallel.sequence_parallel with pipeline or context parallel, or a dense FFN, is not supported; set parallel.sequence_parallel=false")
    if cfg.training.precision == "fp8" and dims.tp > 1:
        raise UserError(f"training.precision=fp8 with parallel.tp={dims.tp} is not supported (no float8 tensor-parallel styles wired); use tp=1 or precision=bf16")
    if dims.pp > 1 and dims.cp > 1:
        raise UserError(f"parallel.pp={dims.pp} with parallel.cp={dims.cp}: pipeline and context parallel together are not supported")
    if dims.pp > 1:
        per_rank = pipeline.stages_per_rank(cfg.parallel.schedule)
        if cfg.model.n_layers < dims.pp * per_rank:
            raise UserError(f"parallel.schedule={cfg.parallel.schedule} needs {dims.pp * per_rank} stages but model.n_layers={cfg.model.n_layers}")
        n_micro = cfg.parallel.microbatches or 2 * dims.pp
        if cfg.training.batch_size % n_micro:
            raise UserError(f"training.batch_size={cfg.training.batch_size} must be divisible by parallel.microbatches={n_micro}")
        if cfg.training.grad_accum_steps != 1:
            raise UserError("training.grad_accum_steps must be 1 with pipeline parallel: microbatches already accumulate")


def build_parallel_model(cfg: JobConfig, dims: ParallelDims, mesh, device: torch.device, dtype: torch.dtype) -> ParallelModel:
    check_supported(cfg, dims)
    p = cfg.parallel
    if dims.pp == 1:
        with torch.device("meta"):
            parts = [GrokModel(cfg.model)]
        indices, n_stages = [0], 1
    else:
        pp_rank = mesh["pp"].get_local_rank()
        n_stages = dims.pp * pipeline.stages_per_rank(p.schedule)
        indices = pipeline.stage_indices(pp_rank, dims.pp, p.schedule)
        parts = [pipeline.build_stage_model(cfg.model, i, n_stages) for i in indices]
    for part in parts:
        if cfg.training.precision == "fp8":
            report = convert_to_float8(part, cfg.training.fp8_recipe, fsdp_float8_all_gather=cfg.training.fp8_recipe == "tensorwise" and dims.dp_shard > 1)
            if (mesh is None or mesh.get_rank() == 0) and part is parts[0]:
                print(report.summary(), flush=True)
        parallelize(part, dims, mesh, param_dtype=dtype, activation_checkpointing=p.activation_checkpointing,
                    compile=cfg.training.compile, sequence_parallel=sequence_parallel(cfg, dims))
        part.to_empty(device=device)
        part.init_weights(cfg.training.seed)
    model = ParallelModel(parts, _view(parts))
    setup_balance_stats(model, cfg, dims, mesh)
    if sequence_parallel(cfg, dims):
        names = set(parts[0].sp_replicated_names)
        model.after_backward.append(ReplicatedGradSync([q for n, q in parts[0].named_parameters() if n in names], mesh["tp"].get_group()))
    if dims.ep > 1:
        model.after_backward.append(ExpertGradScale([b.moe.experts for part in parts for b in map(_unwrap, part.layers.values())], 1.0 / dims.ep))
    if dims.pp > 1:
        def loss_fn(logits, targets):
            return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

        schedule = pipeline.build_schedule(parts, indices, n_stages, mesh["pp"].get_group(), device, p.schedule, p.microbatches or 2 * dims.pp, loss_fn)
        model.schedule = global_microbatches(schedule, cfg, dims, mesh)  # microbatch m: chunk m of the global batch
        model.is_first_stage, model.is_last_stage = 0 in indices, n_stages - 1 in indices
        if cfg.model.tie_embeddings:
            model.after_backward.append(pipeline.TiedEmbeddingSync(mesh, parts))
    return model
