"""`gigafactory health`: verdicts against the fleet median, and a slowed rank named in a real 4-rank run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from gigafactory.cli import main as cli_main
from gigafactory.fleet.health import judge


def rank(i: int, node: str = "n0", matmul: float = 10.0, numerics: str = "abc", **extra) -> dict:
    return {"rank": i, "node": node, "matmul_tflops": matmul, "memory_gbps": 100.0, "numerics": numerics, "errors": [], **extra}


def test_a_slow_rank_is_judged_against_the_median_and_its_node_is_bad():
    report = judge([rank(0), rank(1), rank(2, matmul=5.0), rank(3, node="n1"), rank(4, node="n1")], slow_ratio=0.8)
    assert [r["verdict"] for r in report["ranks"]] == ["ok", "ok", "bad", "ok", "ok"]
    assert "matmul_tflops" in report["ranks"][2]["reasons"][0]
    assert report["bad_nodes"] == ["n0"] and report["nodes"]["n1"]["verdict"] == "ok"


def test_two_ranks_are_not_enough_to_call_one_slow():
    report = judge([rank(0), rank(1, matmul=1.0)], slow_ratio=0.8)
    assert report["bad_nodes"] == [] and "matmul_tflops" not in report["fleet_median"]


def test_numerics_minority_unrepeatable_ecc_and_failed_probes_are_bad():
    ranks = [rank(0), rank(1), rank(2, numerics="zzz"), rank(3, numerics_repeatable=False), rank(4, ecc_uncorrected=2),
             rank(5, errors=["storage probe failed: disk full"])]
    report = judge(ranks, slow_ratio=0.8)
    assert [r["verdict"] for r in report["ranks"]] == ["ok", "ok", "bad", "bad", "bad", "bad"]


def test_a_slow_link_is_judged_per_node():
    ranks = [rank(i, node=f"n{i}", allreduce_world_gbps=40.0 if i != 1 else 10.0) for i in range(4)]
    report = judge(ranks, slow_ratio=0.8)
    assert report["bad_nodes"] == ["n1"] and all(r["verdict"] == "ok" for r in report["ranks"])


@pytest.mark.parametrize("argv, says", [
    (["--slow-ratio", "2"], "--slow-ratio=2.0 must be in (0, 1]"),
    (["--nproc", "0"], "--nproc=0 must be >= 1"),
    (["--out", "{tmp}"], "is a directory"),
    (["--storage-dir", "{tmp}/file"], "is a file"),
])
def test_bad_input_is_one_line(tmp_path, capsys, argv, says):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as exc:
        code = cli_main.main(["health", *[a.format(tmp=tmp_path) for a in argv]])
        raise SystemExit(code)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0]


def test_a_slowed_rank_of_four_is_named(tmp_path):
    out = tmp_path / "health" / "node.json"  # a job's pre-step writes into a directory that may not exist yet
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_",
                                                                    "SLURMD_NODENAME", "NODE_NAME", "GIGAFACTORY_NODE_NAME"))}
    proc = subprocess.run([sys.executable, "-m", "gigafactory.cli.main", "health", "--nproc", "4", "--out", str(out),
                           "--storage-dir", str(tmp_path), "--slow-rank", "2", "--slow-factor", "8",
                           "--slow-ratio", "0.5"],  # 4 ranks share 2 cores: a margin for their own noise
                          capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 1, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["bad_nodes"] == [socket.gethostname()]
    slow = report["ranks"][2]
    assert slow["verdict"] == "bad" and any(why.startswith("matmul_tflops") for why in slow["reasons"])
    assert not any(why.startswith("matmul_tflops") for r in report["ranks"] if r["rank"] != 2 for why in r["reasons"])
    assert len({r["numerics"] for r in report["ranks"]}) == 1 and report["ranks"][0]["storage_write_mbps"] > 0
