"""A worker that trains two steps with async checkpoints, closes the trainer and reports what it left running.

Usage (by tests/train/test_teardown.py): torchrun --nproc-per-node 2 teardown_runner.py RUN_DIR DATA_CACHE"""

import json
import os
import sys
import threading

import torch.distributed as dist

from gigafactory.config.loader import build_config
from gigafactory.train.trainer import Trainer
from tests.conftest import TINY_MODEL


def main() -> None:
    run_dir, data_cache = sys.argv[1], sys.argv[2]
    dotted = {f"model.{k}": v for k, v in TINY_MODEL.items()}
    dotted.update({"data.cache_dir": data_cache, "data.seq_len": 32, "training.batch_size": 4, "training.steps": 2,
                   "training.eval_every": 0, "checkpoint.every": 1, "resilience.async_checkpoint": True,
                   "logging.run_dir": run_dir, "logging.tensorboard": True, "logging.progress": False})
    trainer = Trainer(build_config({}, dotted))
    rank = trainer.rank
    trainer.train()
    trainer.close()
    left = [t.name for t in threading.enumerate() if t is not threading.main_thread() and t.is_alive()]
    # One write(2) of the whole line: both ranks share torchrun's stdout pipe, and print() writes the text and its
    # newline separately, so two ranks' lines could run together (seen once in CI).
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), (json.dumps({"rank": rank, "pg": dist.is_initialized(), "threads": left}) + "\n").encode())


if __name__ == "__main__":
    main()
