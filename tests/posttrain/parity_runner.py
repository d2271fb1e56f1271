"""Run SFT/DPO jobs of several layouts in one torchrun launch (used by test_parity.py).

Usage: torchrun --nproc-per-node N parity_runner.py SPEC.json
SPEC: {"checkpoint": RUN, "runs": [{"name", "kind": "sft" | "dpo", "data": FILE, "overrides": {dotted: value}}]}
"""

import json
import sys
from pathlib import Path

import torch.distributed as dist

from gigafactory.posttrain.dpo import DPOTrainer
from gigafactory.posttrain.options import DPO_DEFAULTS, DPOOptions
from gigafactory.posttrain.sft import SFT_DEFAULTS, SFTData, SFTTrainer, sft_config


def run(checkpoint: str, spec_dir: Path, job: dict, close: bool = True) -> None:
    """One job; under torchrun pass close=False: the process group lives until every job ran (re-creating it
    after Trainer.close() destroyed it can hang the next rendezvous, as layout_runner.py avoids too)."""
    dpo = job["kind"] == "dpo"
    base, cfg = sft_config(checkpoint, run_dir=str(spec_dir / job["name"]), overrides=job["overrides"],
                           defaults=DPO_DEFAULTS if dpo else SFT_DEFAULTS)
    data = SFTData(base, job["data"])
    trainer = DPOTrainer(cfg, data, DPOOptions(beta=0.2)) if dpo else SFTTrainer(cfg, data)
    trainer.train()
    if close:
        trainer.close()
    else:
        trainer.checkpointer.close()


if __name__ == "__main__":
    spec_path = Path(sys.argv[1])
    spec = json.loads(spec_path.read_text())
    for job in spec["runs"]:
        run(spec["checkpoint"], spec_path.parent, job, close=False)
    if dist.is_initialized():
        dist.destroy_process_group()
