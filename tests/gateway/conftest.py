"""A tiny checkpoint for the replicas: 2 training steps (the gateway tests need a model that loads and answers, not
good text), on the session's shared data cache."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def fleet_checkpoint(tmp_path_factory, data_cache):
    from gigafactory.config.loader import build_config
    from gigafactory.train.trainer import Trainer
    from tests.conftest import TINY_MODEL

    run_dir = tmp_path_factory.mktemp("gateway") / "run"
    dotted = {f"model.{k}": v for k, v in TINY_MODEL.items()}
    dotted.update({"data.cache_dir": data_cache, "data.seq_len": 32, "training.batch_size": 2, "training.steps": 2,
                   "training.eval_every": 0, "training.dtype": "fp32", "logging.run_dir": str(run_dir),
                   "logging.tensorboard": False, "logging.progress": False})
    Trainer(build_config({}, dotted)).train()
    return run_dir
