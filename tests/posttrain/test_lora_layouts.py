"""LoRA trains alike on one process and on two: FSDP through `gigafactory sft --nproc 2 --lora.rank R`, expert
parallel and tensor + sequence parallel in one torchrun launch of lora_layout_runner.py (which also checks that the
frozen base has no gradients and that each ep rank holds its own experts' adapters). Per-step losses and gradient
norms agree to fp32 rounding, and every layout's merged checkpoint is the one-process run's (attention and expert
weights moved, everything else the base)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gigafactory.inference.generate import load_for_inference
from tests.posttrain.lora_layout_runner import run

RANK = 4
COMMON = {"training.steps": 3, "training.eval_every": 0, "logging.log_every": 1, "training.dtype": "fp32",
          "checkpoint.every": 0, "optimizer.lr": 1e-2, "optimizer.warmup_steps": 1}
LAYOUTS = {"fsdp": {"parallel.dp_shard": 2, "training.batch_size": 2},
           "ep": {"parallel.ep": 2, "parallel.dp_shard": 1, "training.batch_size": 2},
           "tp_sp": {"parallel.tp": 2, "parallel.dp_shard": 1, "training.batch_size": 4}}


def metrics(run_dir: Path) -> dict:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in recs if "loss" in r}


def test_lora_under_fsdp_ep_and_tp_matches_one_process(pretrained, tmp_path):
    chat, pre = str(pretrained / "chat.jsonl"), str(pretrained / "pre")
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"checkpoint": pre, "data": chat, "rank": RANK, "runs": [
        {"name": name, "overrides": {**COMMON, **LAYOUTS[name]}} for name in ("ep", "tp_sp")]}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env["OMP_NUM_THREADS"] = "1"
    flags = [f"--{k}={v}" for k, v in {**COMMON, **LAYOUTS["fsdp"], "logging.run_dir": tmp_path / "fsdp"}.items()]
    launches = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for cmd in (  # side by side
        [sys.executable, "-m", "gigafactory.cli.main", "sft", "--nproc", "2", "--lora.rank", str(RANK), "--checkpoint", pre, "--data", chat, *flags],
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(Path(__file__).with_name("lora_layout_runner.py")), str(spec)])]
    one = run({"checkpoint": pre, "data": chat, "rank": RANK}, tmp_path, {"name": "one", "overrides": {**COMMON, "training.batch_size": 4}})
    (cli_out, cli_err), (_, runner_err) = (p.communicate(timeout=400) for p in launches)
    assert launches[0].returncode == 0 and "checkpoint:" in cli_out, cli_err[-3000:]
    assert launches[1].returncode == 0, runner_err[-3000:]

    base = dict(load_for_inference(pretrained / "pre").model.named_parameters())
    ref = dict(load_for_inference(tmp_path / "one").model.named_parameters())
    adapted = {t.name for t in one.lora.targets.values()}
    assert {n for n in ref if not torch.equal(ref[n], base[n])} == adapted  # exactly the targets moved
    for layout in LAYOUTS:
        expected, got = metrics(tmp_path / "one"), metrics(tmp_path / layout)
        assert sorted(got) == [1, 2, 3], layout
        for step, (loss, norm) in expected.items():
            assert got[step][0] == pytest.approx(loss, rel=2e-5), (layout, step)
            assert got[step][1] == pytest.approx(norm, rel=1e-4), (layout, step)
        merged = dict(load_for_inference(tmp_path / layout).model.named_parameters())
        for name, p in merged.items():
            torch.testing.assert_close(p, ref[name], rtol=1e-4, atol=1e-5, msg=f"{layout}: {name}")  # Adam steps of ~1e-2
