"""SFT and DPO train alike on one process and on two (FSDP; tensor + sequence parallel for SFT): per-step losses
equal to fp32 rounding, because each rank weights its loss by its share of the micro-batch's tokens (or pairs).
The FSDP SFT run goes through `gigafactory sft --nproc 2` (the launcher `train --nproc` uses); the others share one
torchrun launch of parity_runner.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.posttrain.parity_runner import run

COMMON = {"training.steps": 3, "training.eval_every": 3, "training.eval_batches": 1, "logging.log_every": 1,
          "training.dtype": "fp32", "checkpoint.every": 0}
LAYOUTS = {"fsdp": {"parallel.dp_shard": 2, "training.batch_size": 2},
           "tp_sp": {"parallel.tp": 2, "parallel.dp_shard": 1, "training.batch_size": 4}}


def losses(run_dir: Path) -> tuple[dict, list]:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}, [r["eval_loss"] for r in recs if "eval_loss" in r]


def test_two_process_layouts_match_one_process(pretrained, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Quote verse {i}", "chosen": v, "rejected": v.replace("e", "a")}) + "\n"
                             for i, v in enumerate(["Jesus wept.", "For God so loved the world.", "The LORD is my shepherd."] * 7)))
    chat = str(pretrained / "chat.jsonl")
    jobs = [{"name": "sft-tp_sp", "kind": "sft", "data": chat, "overrides": {**COMMON, **LAYOUTS["tp_sp"]}},
            {"name": "dpo-fsdp", "kind": "dpo", "data": str(pairs), "overrides": {**COMMON, **LAYOUTS["fsdp"], "data.seq_len": 128}}]
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"checkpoint": str(pretrained / "pre"), "runs": jobs}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env["OMP_NUM_THREADS"] = "1"
    flags = [f"--{k}={v}" for k, v in {**COMMON, **LAYOUTS["fsdp"], "logging.run_dir": tmp_path / "sft-fsdp"}.items()]
    launches = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for cmd in (  # side by side
        [sys.executable, "-m", "gigafactory.cli.main", "sft", "--nproc", "2", "--checkpoint", str(pretrained / "pre"), "--data", chat, *flags],
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(Path(__file__).with_name("parity_runner.py")), str(spec)])]
    (cli_out, cli_err), (_, runner_err) = (p.communicate(timeout=300) for p in launches)
    assert launches[0].returncode == 0 and "eval loss (assistant tokens)" in cli_out, cli_err[-3000:]
    assert launches[1].returncode == 0, runner_err[-3000:]

    run(str(pretrained / "pre"), tmp_path, {"name": "sft-one", "kind": "sft", "overrides": {**COMMON, "training.batch_size": 4}, "data": chat})
    run(str(pretrained / "pre"), tmp_path, {"name": "dpo-one", "kind": "dpo", "data": str(pairs),
                                            "overrides": {**COMMON, "training.batch_size": 4, "data.seq_len": 128}})
    for one, many in (("sft-one", "sft-fsdp"), ("sft-one", "sft-tp_sp"), ("dpo-one", "dpo-fsdp")):
        (ref, ref_eval), (got, got_eval) = losses(tmp_path / one), losses(tmp_path / many)
        assert sorted(got) == [1, 2, 3]
        for step in ref:
            assert got[step] == pytest.approx(ref[step], rel=2e-5), (many, step)
        assert got_eval[-1] == pytest.approx(ref_eval[-1], rel=2e-5), many
