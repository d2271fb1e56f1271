"""Run LoRA SFT jobs of several layouts in one torchrun launch (used by test_lora_layouts.py), checking on every
rank what a metrics file cannot show: the frozen base got no gradient (nothing for FSDP to allocate or reduce) and,
under expert parallel, each rank holds only its own experts' adapters.

Usage: torchrun --nproc-per-node N lora_layout_runner.py SPEC.json
SPEC: {"checkpoint": RUN, "data": FILE, "rank": R, "runs": [{"name", "overrides": {dotted: value}}]}
"""

import json
import sys
from pathlib import Path

import torch.distributed as dist

from gigafactory.posttrain.options import LoRAOptions
from gigafactory.posttrain.sft import SFTData, SFTTrainer, sft_config


def run(spec: dict, out_dir: Path, job: dict, close: bool = True) -> SFTTrainer:
    """One job; under torchrun close=False keeps the process group for the next job (as parity_runner.py does)."""
    base, cfg = sft_config(spec["checkpoint"], run_dir=str(out_dir / job["name"]), overrides=job["overrides"])
    trainer = SFTTrainer(cfg, SFTData(base, spec["data"], lora=LoRAOptions(rank=spec["rank"])))
    trainer.train()
    with_grads = [n for n, p in trainer.model.named_parameters() if p.grad is not None]
    assert not with_grads, f"{job['name']}: the frozen base has gradients: {with_grads[:3]}"
    ep, n_experts = trainer.dims.ep, cfg.model.n_experts
    for key, target in trainer.lora.targets.items():
        if target.experts:
            assert trainer.lora.A[key].shape[0] == trainer.lora.B[key].shape[0] == n_experts // ep, (job["name"], key)
    if close:
        trainer.close()
    else:
        trainer.checkpointer.close()
    return trainer


if __name__ == "__main__":
    spec_path = Path(sys.argv[1])
    spec = json.loads(spec_path.read_text())
    for job in spec["runs"]:
        run(spec, spec_path.parent, job, close=False)
    if dist.is_initialized():
        dist.destroy_process_group()
