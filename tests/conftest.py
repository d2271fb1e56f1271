"""Shared fixtures: a tiny job config whose data is prepared once per test session."""

from __future__ import annotations

import pytest

from gigafactory.config.loader import build_config

TINY_MODEL = {
    "vocab_size": 512, "d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
    "max_seq_len": 64, "n_experts": 4, "top_k": 2, "moe_ffn_dim": 64, "embedding_multiplier": 8.0,
}


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data_cache"))


@pytest.fixture
def tiny_job(tmp_path, data_cache):
    """Returns a function building a small, fast JobConfig; keyword args override dotted keys."""

    def make(**overrides):
        dotted = {f"model.{k}": v for k, v in TINY_MODEL.items()}
        dotted.update({
            "data.cache_dir": data_cache, "data.seq_len": 32, "training.batch_size": 4, "training.steps": 6,
            "training.eval_every": 3, "training.eval_batches": 2, "training.dtype": "fp32", "optimizer.warmup_steps": 2,
            "checkpoint.every": 0, "logging.run_dir": str(tmp_path / "run"), "logging.log_every": 1,
            "logging.tensorboard": False, "logging.progress": False,
        })
        dotted.update({k.replace("__", "."): v for k, v in overrides.items()})
        return build_config({}, dotted)

    return make
