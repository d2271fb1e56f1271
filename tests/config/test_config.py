"""Config tree: TOML + overrides resolve to typed values; bad keys, types and shapes are one-line errors."""

from __future__ import annotations

import pytest

from gigafactory.config.loader import build_config, config_to_toml, load_config
from gigafactory.models.config import ConfigError


def test_toml_then_cli_overrides_and_round_trip(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text('[model]\npreset = "grok-1b-moe"\nn_layers = 3\n[optimizer]\nlr = 1e-4\n[data]\ninputs = ["a.txt"]\n')
    cfg = load_config(config_path=str(path), overrides={"model.n_layers": "5", "training.compile": "true"})
    assert (cfg.model.name, cfg.model.d_model, cfg.model.n_layers) == ("grok-1b-moe", 1024, 5)
    assert cfg.optimizer.lr == 1e-4 and cfg.training.compile is True and cfg.data.inputs == ["a.txt"]
    again = tmp_path / "again.toml"
    again.write_text(config_to_toml(cfg))
    assert load_config(config_path=str(again)) == cfg


@pytest.mark.parametrize(
    "dotted, message",
    [
        ({"model.n_layer": 2}, "did you mean 'model.n_layers'"),
        ({"modle.n_layers": 2}, "unknown config key"),
        ({"training.steps": "ten"}, "'training.steps' expects int"),
        ({"training.steps": 1.5}, "'training.steps' expects int"),
        ({"model.n_heads": 5}, "model.n_heads=5 does not divide model.d_model=256"),
        ({"model.n_kv_heads": 3}, "model.n_kv_heads=3 must divide"),
        ({"model.top_k": 9}, "model.top_k=9 exceeds model.n_experts=8"),
        ({"data.seq_len": 4096}, "data.seq_len=4096"),
        ({"parallel.tp": 0}, "parallel.tp=0"),
        ({"training.dtype": "fp16"}, "not one of"),
    ],
)
def test_bad_values_name_the_key(dotted, message):
    with pytest.raises(ConfigError, match=message) as err:
        build_config({}, dotted)
    assert "\n" not in str(err.value)


def test_bad_toml_and_unknown_preset(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\nn_layers = 2")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(config_path=str(bad))
    with pytest.raises(ConfigError, match="unknown model preset 'grok-9'"):
        build_config({"model": {"preset": "grok-9"}}, {})
    with pytest.raises(ConfigError, match="not found"):
        load_config(config_path=str(tmp_path / "missing.toml"))
