"""Issue 18: every bad input to `import` / `export` is one `error:` line, exit 2, and leaves nothing behind."""

from __future__ import annotations

import json
import pickle
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from gigafactory.cli.main import main
from gigafactory.errors import UserError
from gigafactory.interop import export_checkpoint
from gigafactory.interop.storage import parse_size
from tests.interop.grok1_fixture import QuantizedWeight8bit, grok1_pickling
from tests.interop.test_export import trained_checkpoint
from tests.interop.test_grok1_import import DIMS, released, tiny_grok1_cfg  # noqa: F401 - `released` is a fixture

_RECONSTRUCT = np._core.multiarray._reconstruct


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(run dir, hf-grok1 fp32 export of it) of a small grok-tiny model."""
    root = tmp_path_factory.mktemp("exported")
    trained_checkpoint(root / "run", "grok-tiny")
    export_checkpoint(root / "run", "hf-grok1", root / "export", dtype="fp32")
    return root / "run", root / "export"


def one_line_error(capsys, argv: list[str]) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def _config(d):
    return json.loads((d / "config.json").read_text())


def _set_config(d, config):
    (d / "config.json").write_text(json.dumps(config))


def _edit_config(**changes):
    def edit(d):
        _set_config(d, {**_config(d), **changes})
    return edit


def _third_party(**changes):
    """The export as a third-party checkpoint would look: no "gigafactory" block, plus `changes`."""
    def edit(d):
        config = _config(d)
        del config["gigafactory"]
        _set_config(d, {**config, **changes})
    return edit


def _block(**changes):
    def edit(d):
        config = _config(d)
        config["gigafactory"]["model"].update(changes)
        _set_config(d, config)
    return edit


def _shard(d):
    return next(d.glob("*.safetensors"))


def _cut_shard(d):
    f = _shard(d)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _garbage_header(d):
    f = _shard(d)
    data = bytearray(f.read_bytes())
    data[8:40] = b"garbage garbage garbage garbage "
    f.write_bytes(bytes(data))


def _add_tensor(d):
    f = _shard(d)
    with safe_open(str(f), "pt") as src:
        tensors = {k: src.get_tensor(k) for k in src.keys()}
    tensors["model.layers.0.attn.o_proj.bias"] = torch.ones(64)
    save_file(tensors, str(f))
    index = json.loads((d / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.attn.o_proj.bias"] = f.name
    (d / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("damage,needle", [
    (lambda d: (d / "config.json").write_text("{not json"), "is not valid JSON"),
    (lambda d: (d / "config.json").write_text(""), "is not valid JSON"),
    (lambda d: (d / "config.json").write_text("[1,2]"), "holds a JSON list, not an object"),
    (lambda d: (d / "model.safetensors.index.json").write_text("{}"), "is not a safetensors index"),
    (_cut_shard, "is damaged or truncated"),
    (_garbage_header, "is damaged or truncated"),
    (_block(d_model="wide"), "config key 'model.d_model' expects int, got 'wide'"),
    (_block(d_modle=64), "unknown model key 'd_modle'; did you mean 'd_model'?"),
    (_add_tensor, "1 tensor(s) that the hf-grok1 layout does not have (first: model.layers.0.attn.o_proj.bias)"),
    (_edit_config(attn_output_multiplier=0.5), "attn_output_multiplier=0.5 disagrees with its \"gigafactory\" block (1.0)"),
    (_edit_config(rope_scaling={"type": "linear", "factor": 2.0}), "field 'rope_scaling' is not part of the hf-grok1 layout"),
    (_third_party(attn_output_multiplier=0.08838834764831845), "attn_output_multiplier=0.08838834764831845 cannot be imported"),
    (_third_party(my_logit_scale=2.0), "field 'my_logit_scale' is not one Gigafactory reads for hf-grok1"),
    (_third_party(hidden_size="wide"), "config key 'model.d_model' expects int, got 'wide'"),
    (_third_party(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}), "rope_parameters="),
])
def test_import_hf_refuses_bad_or_unhonourable_input(exported, tmp_path, capsys, damage, needle):
    src = tmp_path / "src"
    shutil.copytree(exported[1], src)
    damage(src)
    err = one_line_error(capsys, ["import", "hf", "--from", str(src), "--out", str(tmp_path / "out"), "--no-progress"])
    assert needle in err, err
    assert not (tmp_path / "out").exists()


def test_import_hf_honours_a_third_party_router_cap(exported, tmp_path, capsys):
    """A field that changes the math and that Gigafactory models is honoured, not dropped (it was ignored)."""
    src = tmp_path / "src"
    shutil.copytree(exported[1], src)
    _third_party(router_logit_softcapping=30.0)(src)
    assert main(["import", "hf", "--from", str(src), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    assert "router_softcap = 30.0" in (tmp_path / "out/checkpoints/step-00000000/config.toml").read_text()


@pytest.mark.parametrize("kind", ["export", "import hf", "import grok1"])
@pytest.mark.parametrize("where,needle", [
    ("under-a-file", "cannot write to --out"),
    ("empty-string", "--out is empty"),
    ("empty-file", "is a file, not a directory"),
    ("full-dir", "exists and is not empty"),
])
def test_out_paths_are_one_line_and_leave_nothing(exported, released, tmp_path, capsys, kind, where, needle):  # noqa: F811
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep").write_text("x")
    (tmp_path / "empty_file").write_text("")
    out = {"under-a-file": str(tmp_path / "a_file" / "sub" / "out"), "empty-string": "",
           "empty-file": str(tmp_path / "empty_file"), "full-dir": str(tmp_path / "full")}[where]
    model_toml = _grok1_model_toml(tmp_path)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    argv = {
        "export": ["export", "--checkpoint", str(exported[0]), "--format", "hf-grok1", "--out", out],
        "import hf": ["import", "hf", "--from", str(exported[1]), "--out", out],
        "import grok1": ["import", "grok1", "--from", str(released[0] / "ckpt-0"), "--out", out, "--preset", "grok-1",
                         "--model-config", str(model_toml)],
    }[kind]
    err = one_line_error(capsys, [*argv, "--no-progress"])
    assert needle in err, err
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted(before)


def _grok1_model_toml(tmp_path):
    cfg = tiny_grok1_cfg()
    keys = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "n_experts", "moe_ffn_dim", "max_seq_len",
            "embedding_multiplier", "attn_scale")
    path = tmp_path / "model.toml"
    path.write_text("[model]\n" + "".join(f"{k} = {getattr(cfg, k)!r}\n" for k in keys))
    return path


@pytest.mark.parametrize("text", ["1e400", "inf", "nan", "-5GB", "0", "wide", "2e15"])
def test_max_shard_size_is_a_usable_size(text):
    with pytest.raises(UserError, match="shard size"):
        parse_size(text)


class _Reduce:
    def __init__(self, *reduced):
        self.reduced = reduced

    def __reduce__(self):
        return self.reduced


# tensor00002_000 is layer 0's moe/linear:w, stored int8 [E, D, F] = [4, 64, 32]
_E, _D, _F = DIMS["E"], DIMS["D"], DIMS["F"]


@pytest.mark.parametrize("payload,needle", [
    # a 93-byte pickle declaring a 1 TiB array (was: numpy ArrayMemoryError traceback)
    (_Reduce(_RECONSTRUCT, (np.ndarray, (2**40,), b"b")), "shape (1099511627776,) refused"),
    # the int8 weight as an uninitialised 1 GiB array inside the quantised record (was: 2.4 GB RSS, then a shape error)
    (QuantizedWeight8bit(_Reduce(_RECONSTRUCT, (np.ndarray, (2**30,), b"b")), np.ones((_E, 1, _F), np.float32)), "shape (1073741824,) refused"),
    # a well-formed record of the wrong shape: refused before dequantising
    (QuantizedWeight8bit(np.zeros((_E, _D, 2 * _F), np.int8), np.ones((_E, 1, 2 * _F), np.float32)), f"holds shape ({_E}, {_D}, {2 * _F}), the model config expects ({_E}, {_D}, {_F})"),
    (QuantizedWeight8bit(np.zeros((_E, _D, _F), np.int8), np.ones((_E, 3, _F), np.float32)), "scales of shape (4, 3, 32) do not fit"),
    (np.zeros((_E * 64, _D, _F), np.float32), "bytes, more than a tensor of shape"),
])
def test_grok1_sizes_are_checked_before_allocating(released, tmp_path, payload, needle):  # noqa: F811
    src = tmp_path / "ckpt-0"
    shutil.copytree(released[0] / "ckpt-0", src)
    with grok1_pickling():
        (src / "tensor00002_000").write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(UserError, match="tensor00002_000") as info:
        from gigafactory.interop import import_grok1

        import_grok1(src, tmp_path / "out", tiny_grok1_cfg())
    assert needle in str(info.value)
    assert not (tmp_path / "out").exists()


def test_import_grok1_refuses_a_binary_tokenizer(released, tmp_path, capsys):  # noqa: F811
    (tmp_path / "tok.json").write_bytes(bytes(range(256)) * 4)
    err = one_line_error(capsys, ["import", "grok1", "--from", str(released[0] / "ckpt-0"), "--out", str(tmp_path / "out"),
                                  "--model-config", str(_grok1_model_toml(tmp_path)), "--tokenizer", str(tmp_path / "tok.json")])
    assert "tok.json' is corrupt" in err, err
    assert not (tmp_path / "out").exists()


def test_exports_written_before_issue_18_still_import(tmp_path, capsys):
    """They said model_type "git" (no auto_map) and, for sglang-grok, router_logit_softcapping 30 for a model with 0."""
    trained_checkpoint(tmp_path / "run", "grok-tiny")
    export_checkpoint(tmp_path / "run", "sglang-grok", tmp_path / "export", dtype="fp32")
    config = _config(tmp_path / "export")
    del config["auto_map"]
    _set_config(tmp_path / "export", {**config, "model_type": "git", "router_logit_softcapping": 30.0})
    assert main(["import", "hf", "--from", str(tmp_path / "export"), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    assert "router_softcap = 0.0" in (tmp_path / "out/checkpoints/step-00000000/config.toml").read_text()
