"""SFT and DPO train alike on one process and on two (FSDP; tensor + sequence, pipeline, context parallel): per-step
losses and gradient norms equal to fp32 rounding, because each rank weights its loss by its share of the step's
tokens (or pairs). The FSDP SFT run goes through `gigafactory sft --nproc 2` (the launcher `train --nproc` uses);
the others share one torchrun launch of parity_runner.py. Under context parallel the keys' document ids are
gathered with the keys, so no query sees another packed conversation's keys (a mask error changes the losses).

Pipeline runs split the batch into 4 microbatches, and the router balance loss's unit is the microbatch
(docs/architecture.md), so they and their one-process references train without it (model.aux_loss_weight=0): what
they test is that positions, document ids and pair slots reach every stage with their microbatch, and that the
last stage's loss weights each microbatch to the step's token (pair) mean."""

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
           "tp_sp": {"parallel.tp": 2, "parallel.dp_shard": 1, "training.batch_size": 4},
           "pp": {"parallel.pp": 2, "parallel.dp_shard": 1, "training.batch_size": 4, "model.aux_loss_weight": 0.0},
           "cp": {"parallel.cp": 2, "parallel.dp_shard": 1, "training.batch_size": 4}}
ONE = {"training.batch_size": 4}
ONE_NO_BALANCE = {**ONE, "model.aux_loss_weight": 0.0}


def losses(run_dir: Path) -> tuple[dict, list, dict]:
    """(loss per step, eval losses, gradient norm per step) from a run's metrics.jsonl."""
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return ({r["step"]: r["loss"] for r in recs if "loss" in r}, [r["eval_loss"] for r in recs if "eval_loss" in r],
            {r["step"]: r["grad_norm"] for r in recs if "grad_norm" in r})


def test_two_process_layouts_match_one_process(pretrained, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Quote verse {i}", "chosen": v, "rejected": v.replace("e", "a")}) + "\n"
                             for i, v in enumerate(["Jesus wept.", "For God so loved the world.", "The LORD is my shepherd."] * 7)))
    chat = str(pretrained / "chat.jsonl")
    sft = lambda name, layout: {"name": name, "kind": "sft", "data": chat, "overrides": {**COMMON, **layout}}  # noqa: E731
    dpo = lambda name, layout: {"name": name, "kind": "dpo", "data": str(pairs), "overrides": {**COMMON, **layout, "data.seq_len": 128}}  # noqa: E731
    jobs = [sft("sft-tp_sp", LAYOUTS["tp_sp"]), sft("sft-pp", LAYOUTS["pp"]), sft("sft-cp", LAYOUTS["cp"]),
            dpo("dpo-fsdp", LAYOUTS["fsdp"]), dpo("dpo-tp_sp", LAYOUTS["tp_sp"]), dpo("dpo-pp", LAYOUTS["pp"]), dpo("dpo-cp", LAYOUTS["cp"])]
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

    for job in (sft("sft-one", ONE), sft("sft-one-nobal", ONE_NO_BALANCE), dpo("dpo-one", ONE), dpo("dpo-one-nobal", ONE_NO_BALANCE)):
        run(str(pretrained / "pre"), tmp_path, job)
    compared = (("sft-one", "sft-fsdp"), ("sft-one", "sft-tp_sp"), ("sft-one-nobal", "sft-pp"), ("sft-one", "sft-cp"),
                ("dpo-one", "dpo-fsdp"), ("dpo-one", "dpo-tp_sp"), ("dpo-one-nobal", "dpo-pp"), ("dpo-one", "dpo-cp"))
    for one, many in compared:
        (ref, ref_eval, ref_norm), (got, got_eval, got_norm) = losses(tmp_path / one), losses(tmp_path / many)
        assert sorted(got) == [1, 2, 3]
        for step in ref:
            assert got[step] == pytest.approx(ref[step], rel=2e-5), (many, step)
            assert got_norm[step] == pytest.approx(ref_norm[step], rel=2e-5), (many, step)  # a wrong gradient scale shows here
        assert got_eval[-1] == pytest.approx(ref_eval[-1], rel=2e-5), many
    assert losses(tmp_path / "sft-one")[0][3] != losses(tmp_path / "sft-one-nobal")[0][3]  # the two references differ
