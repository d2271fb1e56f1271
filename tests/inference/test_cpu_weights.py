"""Prepacked CPU weights (inference/cpu_weights.py) compute what the model's own layers compute, for every routing
(experts with no rows included), and packing is idempotent and leaves bf16 models alone."""

from __future__ import annotations

import copy

import pytest
import torch

from gigafactory.config.loader import build_config
from gigafactory.inference.cpu_weights import PackedExperts, PackedLinear, can_pack, pack_for_cpu
from gigafactory.models.grok.model import GrokModel, KVCache
from gigafactory.models.grok.moe import Experts

CFG = {"model.vocab_size": 256, "model.d_model": 64, "model.n_layers": 2, "model.n_heads": 4, "model.n_kv_heads": 2,
       "model.max_seq_len": 32, "data.seq_len": 32, "model.n_experts": 4, "model.top_k": 2, "model.moe_ffn_dim": 96}


def model_pair(**overrides):
    cfg = build_config({}, {**CFG, **overrides}).model
    plain = GrokModel(cfg).eval()
    plain.init_weights(3)
    packed = copy.deepcopy(plain)
    assert pack_for_cpu(packed)
    return plain, packed


@pytest.mark.parametrize("overrides", [{}, {"model.activation": "gelu_tanh", "model.dense_ffn_dim": 80}])
@torch.no_grad()
def test_packed_model_gives_the_plain_models_logits(overrides):
    plain, packed = model_pair(**overrides)
    assert any(isinstance(m, PackedLinear) for m in packed.modules())
    assert sum(isinstance(m, PackedExperts) for m in packed.modules()) == 2
    assert not any(type(m) is Experts for m in packed.modules())
    tokens = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(packed(tokens), plain(tokens), rtol=1e-5, atol=1e-5)
    # with a KV cache too (generate's path), one token at a time
    caches = [KVCache.allocate(m.cfg, 3, 32) for m in (plain, packed)]
    for pos in range(4):
        positions = torch.full((3, 1), pos)
        out = [m(tokens[:, pos:pos + 1], positions, c) for m, c in zip((plain, packed), caches)]
        torch.testing.assert_close(out[1], out[0], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_packed_experts_with_empty_experts_and_no_rows():
    plain, packed = model_pair()
    experts, packed_experts = plain.layers["0"].moe.experts, packed.layers["0"].moe.experts
    x = torch.randn(5, 64)
    for counts in ([5, 0, 0, 0], [0, 2, 0, 3], [1, 1, 1, 2], [0, 0, 0, 0]):
        rows = x[:sum(counts)]
        counts = torch.tensor(counts)
        torch.testing.assert_close(packed_experts(rows, counts), experts(rows, counts), rtol=1e-5, atol=1e-5)


def test_packing_twice_changes_nothing_and_bf16_is_left_alone():
    _, packed = model_pair()
    before = [type(m) for m in packed.modules()]
    assert pack_for_cpu(packed)
    assert [type(m) for m in packed.modules()] == before
    cfg = build_config({}, CFG).model
    bf16 = GrokModel(cfg).to(torch.bfloat16)
    assert not can_pack(bf16) and not pack_for_cpu(bf16)
    assert not any(isinstance(m, (PackedLinear, PackedExperts)) for m in bf16.modules())
