"""Float8 training (torchao): which layers convert, checkpoint compatibility with bf16, and loss close to bf16."""

from __future__ import annotations

import dataclasses
import json
import sys

import pytest
import torch

from gigafactory.errors import UserError
from gigafactory.models import GrokModel, get_preset
from gigafactory.models.float8 import convert_to_float8

pytest.importorskip("torchao", reason="torchao is a test dependency (pyproject [test]); install it to run float8 tests")


def _model(cfg, seed=0, fp8=False, **kw):
    with torch.device("meta"):
        model = GrokModel(cfg)
    report = convert_to_float8(model, **kw) if fp8 else None
    model.to_empty(device="cpu")
    model.init_weights(seed)
    return model, report


def test_projections_convert_and_the_state_dict_is_unchanged():
    cfg = get_preset("grok-tiny")
    fp8, report = _model(cfg, fp8=True)
    ref, _ = _model(cfg)
    kinds = {type(m).__name__ for n, m in fp8.named_modules() if n.endswith((".wq", ".wk", ".wv", ".wo"))}
    assert kinds == {"Float8Linear"}
    assert len(report.converted) == 4 * cfg.n_layers and all("experts" in k for k in report.kept)
    # same names, shapes and values: a float8 run's checkpoint loads into a bf16 model and back
    assert fp8.state_dict().keys() == ref.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(fp8.state_dict().values(), ref.state_dict().values()))


def test_unaligned_layers_and_the_head_stay_in_the_compute_dtype():
    cfg = dataclasses.replace(get_preset("grok-tiny"), d_model=200, n_heads=4, tie_embeddings=False)
    with torch.device("meta"):
        model = GrokModel(cfg)
    report = convert_to_float8(model)
    assert report.kept["lm_head"] == "output head"
    assert not report.converted  # 200 is not a multiple of 16
    assert "multiples of 16" in report.summary()


def test_float8_training_tracks_bf16_but_is_not_bf16():
    cfg = dataclasses.replace(get_preset("grok-tiny"), vocab_size=512, d_model=64, n_layers=2, moe_ffn_dim=64)
    torch.manual_seed(0)
    batches = [torch.randint(0, cfg.vocab_size, (4, 65))] * 8  # one batch, memorised: the loss must fall
    losses = {}
    for fp8 in (False, True):
        model, _ = _model(cfg, fp8=fp8)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses[fp8] = []
        for tokens in batches:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(tokens[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[fp8].append(loss.item())
    bf16, f8 = torch.tensor(losses[False]), torch.tensor(losses[True])
    assert not torch.equal(bf16, f8)  # the float8 GEMMs really ran
    assert ((f8 - bf16).abs() / bf16).max() < 0.02, (losses[False], losses[True])
    assert f8[-1] < f8[0]


def test_bad_float8_settings_are_one_line_errors(monkeypatch):
    with torch.device("meta"):
        model = GrokModel(get_preset("grok-tiny"))
    with pytest.raises(UserError, match="recipe 'int4'"):
        convert_to_float8(model, recipe="int4")
    with pytest.raises(UserError, match="tensorwise"):
        convert_to_float8(model, recipe="rowwise", fsdp_float8_all_gather=True)
    monkeypatch.setitem(sys.modules, "torchao", None)  # as if not installed
    with pytest.raises(UserError, match="pip install"):
        convert_to_float8(model)


def test_trainer_runs_fp8_resumes_in_bf16_and_refuses_tp(tiny_job, tmp_path, capsys):
    """training.precision=fp8 through the real trainer: the swap is reported, the checkpoint resumes under bf16 with
    the same parameter names, and a layout float8 cannot run is one line before anything is built."""
    from gigafactory.parallel.build import check_supported
    from gigafactory.parallel.dims import ParallelDims
    from gigafactory.train.trainer import Trainer

    run = str(tmp_path / "fp8")
    # d_model 64 and the expert width are multiples of 16; batch x seq (4 x 32) too
    Trainer(tiny_job(training__precision="fp8", training__steps=2, training__eval_every=0, logging__run_dir=run)).train()
    assert "float8: " in capsys.readouterr().out
    Trainer(tiny_job(training__precision="bf16", training__steps=3, training__eval_every=0, logging__run_dir=run)).train()
    losses = [json.loads(line) for line in (tmp_path / "fp8" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in losses if "loss" in r] == [1, 2, 3]  # resumed at step 2, not restarted
    job = tiny_job(training__precision="fp8")
    with pytest.raises(UserError, match="precision=fp8 with parallel.tp=2"):
        check_supported(job, ParallelDims(dp_replicate=1, dp_shard=1, tp=2, pp=1, ep=1, cp=1))
