"""What the trainer settles about its job before the first step: the layout checks that must fail before any process
group exists, the collectives' timeout, this rank's data index, and whether a checkpoint holds the same model."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from gigafactory.config.job import JobConfig, ResilienceConfig
from gigafactory.config.loader import load_config
from gigafactory.errors import UserError
from gigafactory.parallel.build import check_supported
from gigafactory.parallel.dims import ParallelDims, resolve_dims
from gigafactory.train.evaluation import check_task_layout

# Model fields a run may change between its checkpoints: they do not change the weights' shapes.
TRAINING_ONLY_MODEL_FIELDS = ("name", "init_std", "aux_loss_weight", "router_z_loss_weight")


def check_layout(cfg: JobConfig, device: torch.device) -> ParallelDims:
    """The resolved parallel layout for WORLD_SIZE ranks; UserError for one this job cannot train. Called before
    any process group exists, so a bad layout is one line rather than a hang in the first collective."""
    if cfg.model.attn_impl == "flex" and device.type == "cpu":
        raise UserError("model.attn_impl=flex cannot train on CPU (FlexAttention has no CPU backward); "
                        "use model.attn_impl=auto or eager")
    dims = resolve_dims(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    check_supported(cfg, dims)
    check_task_layout(cfg, dims)
    return dims


def collective_timeout_s(r: ResilienceConfig) -> float:
    """Collectives time out after the watchdog would have fired, so a hang surfaces as the watchdog's event."""
    return max(60.0, 2 * r.watchdog_timeout_s) if r.watchdog_timeout_s else 1800.0


def data_rank(mesh, dims: ParallelDims) -> int:
    """This rank's index among the ranks that read different data (replicate, shard and ep axes)."""
    if mesh is None:
        return 0
    coord = dict(zip(mesh.mesh_dim_names, mesh.get_coordinate()))
    return (coord["dp_replicate"] * dims.dp_shard + coord["dp_shard"]) * dims.ep + coord["ep"]


def check_same_model(cfg: JobConfig, path: Path) -> None:
    """UserError when the checkpoint at `path` was saved with a different model shape than `cfg.model`."""
    try:
        saved = load_config(config_path=str(path / "config.toml"))
    except Exception:  # noqa: BLE001 - a damaged side file: the load decides whether the checkpoint is usable
        return
    diff = [f"model.{k}: saved {v!r} vs now {getattr(cfg.model, k)!r}" for k, v in vars(saved.model).items()
            if k not in TRAINING_ONLY_MODEL_FIELDS and getattr(cfg.model, k) != v]
    if diff:
        raise UserError(f"checkpoint '{path}' was saved with a different model shape ({'; '.join(diff[:3])}); use a new logging.run_dir or checkpoint.resume=never")
