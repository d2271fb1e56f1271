"""Layout validation happens before any process group exists: bad layouts are one-line errors in well under a second."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest

from gigafactory.config.loader import build_config
from gigafactory.models.config import ConfigError
from gigafactory.parallel.dims import resolve_dims


def cfg(**dotted):
    return build_config({}, {k.replace("__", "."): v for k, v in dotted.items()})


def test_minus_one_takes_the_rest_of_the_world():
    dims = resolve_dims(cfg(parallel__tp=2, parallel__dp_shard=-1), 8)
    assert (dims.dp_shard, dims.tp, dims.world_size, dims.dp) == (4, 2, 8, 4)
    dims = resolve_dims(cfg(parallel__ep=2, parallel__dp_shard=2, parallel__pp=2), 8)
    assert dims.dp == 4 and dims.world_size == 8


@pytest.mark.parametrize(
    "dotted, world, message",
    [
        ({"parallel__dp_shard": 2, "parallel__tp": 2}, 2, "needs 4 processes but the world size is 2"),
        ({"parallel__tp": 4, "parallel__dp_shard": 1}, 4, "parallel.tp=4 must divide model.n_heads=4 and model.n_kv_heads=2"),
        ({"parallel__ep": 3, "parallel__dp_shard": 1}, 3, "parallel.ep=3 must divide model.n_experts=8"),
        ({"parallel__pp": 8, "parallel__dp_shard": 1}, 8, "parallel.pp=8 exceeds model.n_layers=4"),
        ({"parallel__cp": 3, "parallel__dp_shard": 1}, 3, "data.seq_len=256 must be divisible by 2*cp"),
        ({"parallel__tp": -1, "parallel__dp_shard": -1}, 4, "infer at most one"),
        ({"parallel__tp": 2}, 3, "not divisible"),
    ],
)
def test_impossible_layouts_name_the_reason(dotted, world, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        resolve_dims(cfg(**dotted), world)


def test_cli_refuses_a_bad_layout_before_starting_processes(tmp_path):
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "gigafactory.cli.main", "train", "--nproc", "2", "--parallel.tp", "2",
                             "--parallel.dp_shard", "2", "--logging.run_dir", str(tmp_path / "run")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "needs 4 processes but the world size is 2" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()
    assert time.perf_counter() - started < 30  # interpreter + torch import; no torchrun, no process group
