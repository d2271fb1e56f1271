"""Export to hf-grok1 / sglang-grok / hf-mixtral: round trips, engine name sets, refusals, shards, transformers parity."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch

from gigafactory.cli.main import main
from gigafactory.config.job import JobConfig
from gigafactory.config.loader import config_to_toml
from gigafactory.errors import UserError
from gigafactory.interop import export_checkpoint, import_safetensors
from gigafactory.interop.storage import GigafactorySource, SafetensorsSource
from gigafactory.models import GrokModel
from gigafactory.models.presets import get_preset
from gigafactory.train.checkpoint import save_checkpoint

SMALL = dict(vocab_size=384, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, n_experts=4, moe_ffn_dim=32, max_seq_len=64)


def trained_checkpoint(root, preset: str, **overrides):
    """A checkpoint written by the trainer's own save path (with optimizer state), for a small `preset` model."""
    cfg = dataclasses.replace(get_preset(preset), **{**SMALL, **overrides})
    model = GrokModel(cfg)
    model.init_weights(3)
    opt = torch.optim.AdamW(model.parameters())
    job = JobConfig(model=cfg)
    job.data.seq_len = 32
    ckpt = save_checkpoint(root / "checkpoints", 7, model, opt, {"step": 7}, {"config.toml": config_to_toml(job)}, keep=1)
    return ckpt, model


FORMAT_PRESETS = [("hf-grok1", "grok-tiny"), ("sglang-grok", "grok-tiny"), ("hf-mixtral", "mixtral-tiny")]


@pytest.mark.parametrize("fmt,preset", FORMAT_PRESETS)
def test_round_trip_is_exact(tmp_path, fmt, preset):
    ckpt, model = trained_checkpoint(tmp_path / "run", preset)
    files = export_checkpoint(ckpt, fmt, tmp_path / "export", dtype="fp32", max_shard_bytes=150_000)
    assert len(files) > 1
    index = json.loads((tmp_path / "export" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {f.name for f in files}
    assert all(re.fullmatch(rf"model-\d{{5}}-of-{len(files):05d}\.safetensors", f.name) for f in files)
    assert index["metadata"]["total_size"] == sum(p.numel() * 4 for p in model.parameters()) + (
        model.embed.weight.numel() * 4 if fmt == "sglang-grok" else 0)  # sglang's explicit lm_head copy
    back = import_safetensors(tmp_path / "export", tmp_path / "back")
    source = GigafactorySource(back)
    assert source.cfg == model.cfg
    state = model.state_dict()
    assert set(source.shapes) == set(state)
    for key, value in state.items():
        assert torch.equal(source.get(key), value), key


def test_bf16_export_and_gigafactory_config_free_import(tmp_path):
    ckpt, model = trained_checkpoint(tmp_path / "run", "grok-tiny")
    export_checkpoint(ckpt, "sglang-grok", tmp_path / "export")  # default bf16
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    del config["gigafactory"]  # as a third-party checkpoint would be: derive the config from the engine fields
    (tmp_path / "export" / "config.json").write_text(json.dumps(config))
    back = GigafactorySource(import_safetensors(tmp_path / "export", tmp_path / "back"))
    for field in ("d_model", "n_layers", "n_heads", "n_kv_heads", "n_experts", "top_k", "moe_ffn_dim", "embedding_multiplier",
                  "output_multiplier", "attn_softcap", "vocab_size", "rope_theta", "router_renormalize"):
        assert getattr(back.cfg, field) == getattr(model.cfg, field), field
    for key, value in model.state_dict().items():
        assert torch.equal(back.get(key), value.to(torch.bfloat16)), key


def vllm_grok1_loaded_params(cfg) -> dict[str, tuple[int, ...]]:
    """Parameters vLLM's Grok1ForCausalLM.load_weights fills, written from vllm/model_executor/models/grok1.py
    (commit 02082de): the checkpoint names it accepts, after its renames, with the shape each must have.

    stacked_params_mapping: q_proj/k_proj/v_proj -> qkv_proj; expert mapping
    make_expert_params_mapping(gate="linear", down="linear_1", up="linear_v"): experts.{e}.{linear,linear_v,linear_1}.;
    "norm.scale" -> "norm.weight"; lm_head skipped when tie_word_embeddings."""
    D, F, E = cfg.d_model, cfg.moe_ffn_dim, cfg.n_experts
    head_dim = D // cfg.n_heads  # vLLM: hidden_size // num_attention_heads
    names = {"model.embed_tokens.weight": (cfg.vocab_size, D), "model.norm.scale": (D,)}
    if not cfg.tie_embeddings:
        names["lm_head.weight"] = (cfg.vocab_size, D)
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        names[p + "attn.q_proj.weight"] = (cfg.n_heads * head_dim, D)
        names[p + "attn.k_proj.weight"] = (cfg.n_kv_heads * head_dim, D)
        names[p + "attn.v_proj.weight"] = (cfg.n_kv_heads * head_dim, D)
        names[p + "attn.o_proj.weight"] = (D, cfg.n_heads * head_dim)
        names[p + "moe_block.gate.weight"] = (E, D)  # ReplicatedLinear(hidden_size, num_experts)
        for norm in ("pre_attn_norm", "post_attn_norm", "pre_moe_norm", "post_moe_norm"):
            names[p + norm + ".scale"] = (D,)
        for e in range(E):  # FusedMoE w13 shards are [F, D] (gate = linear, up = linear_v); w2 is [D, F]
            names[p + f"moe_block.experts.{e}.linear.weight"] = (F, D)
            names[p + f"moe_block.experts.{e}.linear_v.weight"] = (F, D)
            names[p + f"moe_block.experts.{e}.linear_1.weight"] = (D, F)
    return names


def vllm_rename(name: str) -> str | None:
    """vLLM grok1 load_weights' renaming of one checkpoint name to its parameter (None = silently skipped)."""
    for shard in ("q_proj", "k_proj", "v_proj"):
        if shard in name:
            return name.replace(shard, "qkv_proj")
    m = re.search(r"experts\.(\d+)\.(linear_v|linear_1|linear)\.", name)
    if m:
        return name.replace(m.group(0), "experts.w2_" if m.group(2) == "linear_1" else "experts.w13_")
    if "norm.scale" in name:
        return name.replace("scale", "weight")
    return name


@pytest.mark.parametrize("tied", [True, False])
def test_hf_grok1_names_and_shapes_match_vllm_loader(tmp_path, tied):
    ckpt, model = trained_checkpoint(tmp_path / "run", "grok-tiny", tie_embeddings=tied)
    export_checkpoint(ckpt, "hf-grok1", tmp_path / "export")
    st = SafetensorsSource(tmp_path / "export")
    assert st.shapes == vllm_grok1_loaded_params(model.cfg)
    vllm_params = {f"model.layers.{i}.{n}" for i in range(model.cfg.n_layers) for n in (
        "attn.qkv_proj.weight", "attn.o_proj.weight", "moe_block.gate.weight", "moe_block.experts.w13_weight",
        "moe_block.experts.w2_weight", "pre_attn_norm.weight", "post_attn_norm.weight", "pre_moe_norm.weight", "post_moe_norm.weight")}
    vllm_params |= {"model.embed_tokens.weight", "model.norm.weight"} | (set() if tied else {"lm_head.weight"})
    renamed = {vllm_rename(n) for n in st.names()}
    assert renamed == vllm_params  # every exported name is known to vLLM, and every vLLM parameter gets loaded
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["architectures"] == ["Grok1ModelForCausalLM"] and config["tie_word_embeddings"] is tied
    assert config["num_experts"] == 4 and config["intermediate_size"] == 32 and config["attn_output_multiplier"] == 1.0
    assert config["embedding_multiplier_scale"] == model.cfg.embedding_multiplier
    assert "residual_moe" not in config and "moe_intermediate_size" not in config  # would select vLLM's Grok-2 class


def test_sglang_names(tmp_path):
    ckpt, model = trained_checkpoint(tmp_path / "run", "grok-2", head_dim=0, max_seq_len=64, dense_ffn_dim=48)
    export_checkpoint(ckpt, "sglang-grok", tmp_path / "export", dtype="fp32")
    names = set(SafetensorsSource(tmp_path / "export").names())
    layer = {"self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
             "block_sparse_moe.gate.weight", "pre_attn_norm.weight", "post_attn_norm.weight", "pre_moe_norm.weight",
             "post_moe_norm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"}
    layer |= {f"block_sparse_moe.experts.{e}.{w}.weight" for e in range(4) for w in ("w1", "w2", "w3")}
    assert names == {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} | {
        f"model.layers.{i}.{n}" for i in range(2) for n in layer}
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["residual_moe"] is True and config["moe_intermediate_size"] == 32 and config["intermediate_size"] == 48
    assert config["num_local_experts"] == 4 and config["load_presharded_moe"] is False
    back = GigafactorySource(import_safetensors(tmp_path / "export", tmp_path / "back"))
    assert back.cfg == model.cfg
    assert all(torch.equal(back.get(k), v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("fmt,preset,overrides,field", [
    ("hf-mixtral", "grok-tiny", {}, "norm_placement"),
    ("hf-mixtral", "mixtral-tiny", {"embedding_multiplier": 2.0}, "embedding_multiplier"),
    ("hf-mixtral", "mixtral-tiny", {"attn_softcap": 30.0}, "attn_softcap"),
    ("hf-grok1", "mixtral-tiny", {}, "norm_placement"),
    ("hf-grok1", "grok-tiny", {"dense_ffn_dim": 48}, "dense_ffn_dim"),
    ("hf-grok1", "grok-tiny", {"attn_scale": 0.5}, "attn_scale"),
    ("hf-grok1", "grok-tiny", {"head_dim": 32}, "head_dim"),
    ("sglang-grok", "grok-tiny", {"router_renormalize": True}, "router_renormalize"),
    ("sglang-grok", "grok-tiny", {"activation": "silu"}, "activation"),
])
def test_export_refuses_unrepresentable_fields(tmp_path, fmt, preset, overrides, field):
    ckpt, _ = trained_checkpoint(tmp_path / "run", preset, **overrides)
    with pytest.raises(UserError, match=rf"cannot export to {fmt}: model\.{field}="):
        export_checkpoint(ckpt, fmt, tmp_path / "export")
    assert not (tmp_path / "export").exists()


def test_mixtral_preset_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    ckpt, model = trained_checkpoint(tmp_path / "run", "mixtral-tiny", n_experts=8)
    export_checkpoint(ckpt, "hf-mixtral", tmp_path / "export", dtype="fp32")
    hf, info = transformers.MixtralForCausalLM.from_pretrained(str(tmp_path / "export"), dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    hf.eval()
    model.eval()
    tokens = torch.randint(0, SMALL["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(tokens), hf(tokens).logits
    assert ours.std() > 0.05
    print(f"max |logits diff| vs transformers: {(theirs - ours).abs().max().item():.3g}")
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)


def test_cli_export_and_import(tmp_path, capsys):
    ckpt, model = trained_checkpoint(tmp_path / "run", "grok-tiny")
    assert main(["export", "--checkpoint", str(tmp_path / "run"), "--format", "hf-grok1", "--out", str(tmp_path / "e"),
                 "--max-shard-size", "100KB", "--dtype", "fp32"]) == 0
    assert len(list((tmp_path / "e").glob("*.safetensors"))) > 1
    assert main(["import", "hf", "--from", str(tmp_path / "e"), "--out", str(tmp_path / "b")]) == 0
    assert torch.equal(GigafactorySource(tmp_path / "b").get("layers.1.moe.experts.w_down"), model.state_dict()["layers.1.moe.experts.w_down"])
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(tmp_path / "run"), "--format", "hf-mixtral", "--out", str(tmp_path / "m")]) == 2
    assert "model.norm_placement='sandwich'" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(tmp_path / "run"), "--format", "hf-grok1", "--out", str(tmp_path / "e")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["import", "grok1", "--from", str(tmp_path / "nowhere"), "--out", str(tmp_path / "g")]) == 2
    assert "not found" in capsys.readouterr().err
