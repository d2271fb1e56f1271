"""A tiny pre-trained checkpoint and a chat file, shared by the post-training tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gigafactory.train.trainer import Trainer

VERSES = ["In the beginning God created the heaven and the earth.", "And God said, Let there be light: and there was light.",
          "Jesus wept.", "The LORD is my shepherd; I shall not want.", "For God so loved the world."]


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory) -> Path:
    """A 2-step pre-training run of the tiny model on a few verses (its own small tokenizer)."""
    from gigafactory.config.loader import build_config
    from tests.conftest import TINY_MODEL

    root = tmp_path_factory.mktemp("sft")
    (root / "text.txt").write_text("\n".join(VERSES * 40))
    dotted = {f"model.{k}": v for k, v in {**TINY_MODEL, "max_seq_len": 256}.items()}  # room for eval prompts
    dotted.update({"data.inputs": [str(root / "text.txt")], "data.cache_dir": str(root / "cache"), "data.seq_len": 64, "data.val_fraction": 0.2,
                   "training.batch_size": 2, "training.steps": 2, "training.eval_every": 0,
                   "training.dtype": "fp32", "checkpoint.every": 0, "logging.run_dir": str(root / "pre"),
                   "logging.tensorboard": False, "logging.progress": False})
    trainer = Trainer(build_config({}, dotted))
    trainer.train()
    trainer.close()
    chat = root / "chat.jsonl"
    with chat.open("w") as f:
        for i in range(24):
            v = VERSES[i % len(VERSES)]
            f.write(json.dumps({"messages": [{"role": "user", "content": f"Quote verse {i % len(VERSES)}"},
                                             {"role": "assistant", "content": v}]}) + "\n")
    return root


