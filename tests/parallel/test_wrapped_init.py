"""Activation checkpointing and torch.compile wrap each block, which renames its parameters
(`layers.0._checkpoint_wrapped_module.attn...`). Initial weights are seeded by name, so they must be seeded by the
single-device name: otherwise turning recomputation on would change the model being trained."""

from __future__ import annotations

import pytest
import torch

from gigafactory.config.loader import build_config
from gigafactory.models.grok.model import GrokModel, plain_name
from gigafactory.parallel.build import build_parallel_model
from gigafactory.parallel.dims import ParallelDims

SMALL = {"model.vocab_size": 128, "model.d_model": 32, "model.n_layers": 2, "model.n_heads": 4, "model.n_kv_heads": 2,
         "model.max_seq_len": 32, "data.seq_len": 32, "model.n_experts": 4, "model.top_k": 2, "model.moe_ffn_dim": 32,
         "training.dtype": "fp32", "training.seed": 7}


@pytest.mark.parametrize("wrapping", [{"parallel.activation_checkpointing": "full"},
                                      {"parallel.activation_checkpointing": "selective"},
                                      {"training.compile": True},
                                      {"parallel.activation_checkpointing": "full", "training.compile": True}])
def test_wrapped_blocks_start_from_the_plain_models_weights(wrapping):
    plain_cfg = build_config({}, SMALL)
    reference = GrokModel(plain_cfg.model)
    reference.init_weights(plain_cfg.training.seed)
    expected = dict(reference.named_parameters())

    cfg = build_config({}, {**SMALL, **wrapping})
    dims = ParallelDims(pp=1, dp_replicate=1, dp_shard=1, ep=1, cp=1, tp=1)
    model = build_parallel_model(cfg, dims, None, torch.device("cpu"), torch.float32).parts[0]
    got = {plain_name(n): p for n, p in model.named_parameters()}
    assert any(n != plain_name(n) for n, _ in model.named_parameters()), "the wrapping under test renamed nothing"
    assert got.keys() == expected.keys()
    for name, p in got.items():
        assert torch.equal(p, expected[name]), name


def test_plain_name_strips_only_wrapper_prefixes():
    assert plain_name("layers.3._checkpoint_wrapped_module._orig_mod.moe.experts.w_up") == "layers.3.moe.experts.w_up"
    assert plain_name("layers.3.attn.wq.weight") == "layers.3.attn.wq.weight"
