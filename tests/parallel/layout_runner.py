"""Run several training layouts in one torchrun launch (process start-up dominates on CPU).

Usage (by tests/parallel/test_layouts.py): torchrun --nproc-per-node N layout_runner.py SPEC.json
SPEC: {"base": {dotted: value}, "runs": [{"name": str, "overrides": {dotted: value}, "resume_from": name | null}]}
Each run trains in SPEC_DIR/name; a run with resume_from starts from a copy of that run's directory minus its
newest checkpoint, i.e. it resumes the other layout's checkpoint under its own layout.
"""

import json
import shutil
import sys
from pathlib import Path

import torch.distributed as dist

from gigafactory.config.loader import build_config
from gigafactory.train.trainer import Trainer


def main() -> None:
    spec_path = Path(sys.argv[1])
    spec = json.loads(spec_path.read_text())
    for run in spec["runs"]:
        run_dir = spec_path.parent / run["name"]
        if (run_dir / "metrics.jsonl").exists() and not run.get("resume_from"):
            continue  # done by an earlier launch (handy when iterating by hand)
        dotted = {**spec["base"], **run["overrides"], "logging.run_dir": str(run_dir)}
        cfg = build_config({}, dotted)
        if run.get("resume_from"):
            if not dist.is_initialized() or dist.get_rank() == 0:
                source = spec_path.parent / run["resume_from"]
                shutil.copytree(source, run_dir)
                newest = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
                shutil.rmtree(newest)
                (run_dir / "metrics.jsonl").write_text("")
            if dist.is_initialized():
                dist.barrier()
        Trainer(cfg).train()
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
