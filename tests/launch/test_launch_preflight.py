"""`launch --health --spares K`: the job files check every node before training and train on healthy ones.

Slurm: the generated script is run under the stub srun/scontrol with a stand-in for python whose `health` writes a
per-node report (one node broken, one slow, one silent) and whose torchrun records where it ran; `health --pick`
is the real one. Kubernetes: the manifest is checked against the Kubernetes and Kubeflow schemas.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.launch import slurm_stub
from tests.launch.launch_helpers import check_sbatch, launch, load_yaml_documents, pod_of

FAKE_PYTHON = """
import json, os, sys
args = sys.argv[1:]
if "--pick" in args:  # the real selection
    os.execv(REAL, [REAL, *args])
if "health" in args:
    node = os.environ["SLURMD_NODENAME"]
    out = args[args.index("--out") + 1]
    if node == "node-d":
        sys.exit(137)  # a hung or crashed check: no report
    speed = {"node-b": 0.2}.get(node, 1.0)  # node-b: a fifth of the others' speed (fine on its own)
    ranks = [{"rank": r, "node": node, "errors": [], "numerics": "beef", "matmul_tflops": speed * (1 + r / 100),
              "memory_gbps": 100.0} for r in range(2)]
    if node == "node-c":
        ranks[1]["errors"].append("compute probe failed: CUDA error: uncorrectable ECC error encountered")
    json.dump({"ranks": ranks, "bad_nodes": [node] if node == "node-c" else []}, open(out, "w"))
    sys.exit(1 if node == "node-c" else 0)
with open(os.path.join(os.environ["STUB_SLURM_DIR"], "train-" + os.environ["SLURMD_NODENAME"]), "w") as f:
    json.dump(args, f)
"""


def run_sbatch(tmp_path, capsys, nodes: int, spares: int, hosts: str, straggler: str | None = None):
    run_dir = tmp_path / "run"
    rc, out, err = launch(capsys, "slurm", "--nodes", str(nodes), "--gpus-per-node", "2", "--spares", str(spares),
                          "--run-dir", str(run_dir), "--name", "pre")
    assert rc == 0, err
    check_sbatch(out, tmp_path)
    if straggler:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "bad_nodes.json").write_text(json.dumps({"bad_nodes": [straggler]}))
    script = tmp_path / "job.sbatch"
    script.write_text(out)
    fake = tmp_path / "fakepython"
    fake.write_text(f"#!{sys.executable}\nREAL = {sys.executable!r}\n{FAKE_PYTHON}")
    fake.chmod(0o755)
    state = tmp_path / "slurm"
    env = {**os.environ, **slurm_stub.install(tmp_path / "bin", state, hosts=hosts), "PYTHON": str(fake),
           "SLURM_JOB_NODELIST": "node-[a-f]", "SLURM_JOB_ID": "900"}
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=120)
    return out, proc, state, run_dir


def test_sbatch_drops_failed_slow_silent_and_straggler_nodes_and_trains_on_spares(tmp_path, capsys):
    out, proc, state, run_dir = run_sbatch(tmp_path, capsys, nodes=2, spares=4, hosts="node-a,node-b,node-c,node-d,node-e,node-f",
                                           straggler="node-e")
    assert "#SBATCH --nodes=6\n" in out and "(+ 4 spare node(s))" in out
    assert proc.returncode == 0, proc.stdout + proc.stderr
    steps = (state / "steps.log").read_text().splitlines()
    assert steps[0].startswith("- nodes=6 nodelist=node-a,node-b,node-c,node-d,node-e,node-f kill_on_bad_exit=0")
    assert steps[1] == "- nodes=2 nodelist=node-a,node-f kill_on_bad_exit=1"  # b slow, c failed, d silent, e straggler
    argv = json.loads((state / "train-node-a").read_text())
    assert "--rdzv-endpoint=node-a:29400" in argv and "--nnodes=2" in argv
    fleet = json.loads(next(run_dir.glob("health/job-900-0/fleet.json")).read_text())
    assert fleet["chosen"] == ["node-a", "node-f"] and sorted(fleet["dropped"]) == ["node-b", "node-c", "node-d", "node-e"]
    assert "matmul_tflops" in fleet["dropped"]["node-b"][0] and "no health report" in fleet["dropped"]["node-d"][0]
    assert "ECC" in fleet["dropped"]["node-c"][0] and "bad_nodes.json" in fleet["dropped"]["node-e"][0]


def test_pick_stops_when_too_few_nodes_are_healthy(tmp_path, capsys):
    """`health --pick` (the script's selection step) exits 1 with one line naming why, and still writes its report."""
    from gigafactory.cli import main as cli_main

    for node, tflops in (("n1", 1.0), ("n2", 1.0), ("n3", 0.1)):
        ranks = [{"rank": 0, "node": node, "errors": [], "numerics": "beef", "matmul_tflops": tflops}]
        (tmp_path / f"{node}.json").write_text(json.dumps({"ranks": ranks}))
    out = tmp_path / "fleet.json"
    argv = ["health", "--pick", "3", "--reports", str(tmp_path), "--candidates", "n1,n2,n3,n4", "--out", str(out)]
    assert cli_main.main(argv) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "only 2 of 4 nodes are healthy and the job needs 3" in captured.err
    assert sorted(json.loads(out.read_text())["dropped"]) == ["n3", "n4"]
    assert cli_main.main([*argv[:2], "2", *argv[3:]]) == 0 and capsys.readouterr().out == "n1,n2\n"


def test_k8s_health_init_container_spares_and_own_rendezvous_store(capsys):
    from tests.launch.k8s_schema import validate_manifest

    rc, out, err = launch(capsys, "k8s", "--nodes", "2", "--gpus-per-node", "8", "--spares", "1", "--name", "pre")
    assert rc == 0, err
    assert "&id" not in out  # every mapping written out in full, no YAML anchors
    docs = load_yaml_documents(out)
    validate_manifest(docs)
    job = next(d for d in docs if d["kind"] == "PyTorchJob")
    pod = pod_of(job)
    (init,) = pod["initContainers"]
    assert init["command"][3:6] == ["health", "--nproc", "8"] and init["resources"] == pod["containers"][0]["resources"]
    assert {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}} in init["env"]
    assert job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 3
    assert job["spec"]["elasticPolicy"]["minReplicas"] == 2 and job["spec"]["elasticPolicy"]["maxReplicas"] == 3
    assert job["spec"]["runPolicy"]["schedulingPolicy"]["minAvailable"] == 2
    command = pod["containers"][0]["command"]
    assert "--nnodes=2" in command and "--rdzv-endpoint=pre-rdzv:29400" in command and "--rdzv-conf=is_host=false" in command
    service = next(d for d in docs if d["kind"] == "Service")
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    assert service["metadata"]["name"] == "pre-rdzv" and service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]


@pytest.mark.parametrize("argv,needle", [
    (["--spares", "-1"], "--spares -1 must be >= 0"),
    (["--spares", str(10**50)], "is over 100,000 nodes"),
    (["--spares", "1", "--", "--fault_tolerance.enabled", "true", "--fault_tolerance.replica_groups", "2"], "not available with fault_tolerance"),
])
def test_bad_spares_are_one_line(capsys, argv, needle):
    rc, out, err = launch(capsys, "slurm", "--nodes", "2", "--gpus-per-node", "1", *argv)
    assert rc == 2 and out == "" and err.count("\n") == 1 and needle in err, err
