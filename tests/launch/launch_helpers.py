"""What the launch tests share: a tiny job config, running `gigafactory launch` in-process, reading its YAML."""

from __future__ import annotations

from pathlib import Path

import yaml

from gigafactory.cli.main import main
from tests.launch.sbatch_rules import real_sbatch_errors, sbatch_directives

TINY = """\
[model]
vocab_size = 512
d_model = 64
n_layers = 2
n_heads = 4
n_kv_heads = 2
max_seq_len = 64
n_experts = 4
top_k = 2
moe_ffn_dim = 64

[data]
seq_len = 32

[parallel]
{parallel}

[logging]
run_dir = "runs/tiny-job"
"""


def write_config(tmp_path: Path, parallel: str = "dp_shard = -1\ntp = 2", name: str = "tiny job.toml", extra: str = "") -> Path:
    path = tmp_path / name
    path.write_text(TINY.format(parallel=parallel) + extra)
    return path


def launch(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["launch", *argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def load_yaml_documents(text: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(text) if doc is not None]


def pod_of(job: dict) -> dict:
    return job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]


def check_sbatch(script: str, work: Path) -> dict[str, str | None]:
    """#SBATCH options as sbatch reads them (AssertionError on any it would reject); the real sbatch too if here."""
    directives = dict(sbatch_directives(script))
    path = work / "check.sbatch"
    path.write_text(script)
    assert real_sbatch_errors(path, work) in (None, ""), real_sbatch_errors(path, work)
    return directives
