"""`gigafactory sft` end to end on a tiny pre-trained model: starts from its weights, trains, resumes exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gigafactory.cli.main import main
from gigafactory.inference.generate import load_for_inference
from gigafactory.posttrain.sft import SFTData, SFTTrainer, sft_config

OVERRIDES = {"training.steps": 4, "training.eval_every": 2, "training.eval_batches": 1, "training.batch_size": 2,
             "logging.log_every": 1, "checkpoint.every": 0}


def losses(run_dir: Path) -> dict[int, float]:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


def test_sft_cli_starts_from_the_checkpoint_and_resumes_exactly(pretrained, capsys):
    run_a = pretrained / "sft-a"
    flags = [f"--{k}={v}" for k, v in OVERRIDES.items()]
    assert main(["sft", "--checkpoint", str(pretrained / "pre"), "--data", str(pretrained / "chat.jsonl"),
                 f"--logging.run_dir={run_a}", *flags]) == 0
    assert "eval loss (assistant tokens)" in capsys.readouterr().out
    straight = losses(run_a)
    assert sorted(straight) == [1, 2, 3, 4]

    # The same job interrupted after step 2 (a checkpoint, as on SIGTERM) and run again: steps 3-4 are identical.
    base, cfg = sft_config(str(pretrained / "pre"), run_dir=str(pretrained / "sft-b"), overrides=OVERRIDES)
    data = SFTData(base, str(pretrained / "chat.jsonl"))
    first = SFTTrainer(cfg, data)
    first.train(stop_at=2)
    first.close()
    second = SFTTrainer(cfg, data)
    summary = second.train()
    second.close()
    assert summary["start_step"] == 2
    resumed = losses(pretrained / "sft-b")
    assert resumed[3] == pytest.approx(straight[3], abs=1e-6) and resumed[4] == pytest.approx(straight[4], abs=1e-6)

    # The SFT checkpoint is an ordinary one (generate/serve load it), and training started from the pre-trained
    # weights: step 1 of SFT is the pre-trained model's weights plus one update, far from a fresh init.
    pre, tuned = load_for_inference(pretrained / "pre").model, load_for_inference(run_a).model
    fresh = SFTTrainer(cfg, data)
    moved_from_pre = max((a - b).abs().max().item() for a, b in zip(pre.parameters(), tuned.parameters()))
    fresh.initial_weights()
    assert all(torch.equal(a, b) for a, b in zip(pre.parameters(), fresh.model.parameters()))
    fresh.close()
    assert 0 < moved_from_pre < 0.05


def test_sft_bad_input_is_one_line(pretrained, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    assert main(["sft", "--checkpoint", str(pretrained / "pre"), "--data", str(bad), f"--logging.run_dir={tmp_path / 'r'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no assistant turn" in err
