"""`gigafactory launch slurm|k8s --exclude FILE`: a health check's bad-node list keeps the job off those nodes.

The file's names reach `#SBATCH --exclude` (checked with sbatch's rules, and the real sbatch when installed) and a
required node anti-affinity on every pod (checked against the Kubernetes schema); anything else in the file is one
line on stderr and exit code 2, never a directive or a YAML line of its own.
"""

from __future__ import annotations

import json

import pytest

from tests.launch.launch_helpers import check_sbatch, launch, load_yaml_documents, pod_of


@pytest.mark.parametrize("content", [["node-1", "node-2"], {"bad_nodes": ["node-1", "node-2", "node-1"], "verdicts": {}}])
def test_exclude_reaches_sbatch_and_pod_affinity(tmp_path, capsys, content):
    from tests.launch.k8s_schema import validate_manifest

    bad = tmp_path / "bad_nodes.json"
    bad.write_text(json.dumps(content))
    rc, out, err = launch(capsys, "slurm", "--nodes", "2", "--gpus-per-node", "1", "--exclude", str(bad))
    assert rc == 0, err
    assert check_sbatch(out, tmp_path)["exclude"] == "node-1,node-2"
    rc, out, err = launch(capsys, "k8s", "--nodes", "2", "--gpus-per-node", "1", "--exclude", str(bad))
    assert rc == 0, err
    docs = load_yaml_documents(out)
    validate_manifest(docs)
    (term,) = pod_of(docs[-1])["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert term == {"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "NotIn", "values": ["node-1", "node-2"]}]}


def test_empty_exclude_list_warns(tmp_path, capsys):
    bad = tmp_path / "none.json"
    bad.write_text('{"bad_nodes": []}')
    rc, out, err = launch(capsys, "slurm", "--nodes", "1", "--gpus-per-node", "1", "--exclude", str(bad))
    assert rc == 0 and "--exclude" not in out.split("\n", 2)[2] and "lists no nodes" in err


@pytest.mark.parametrize("content,needle", [
    (None, "file not found"),
    ("[node-1]", "not valid JSON (line 1"),
    ('{"nodes": ["a"]}', 'needs a "bad_nodes" list (keys found: nodes)'),
    ('"node-1"', "expected a JSON list of hostname strings"),
    ("[1, 2]", "expected a JSON list of hostname strings"),
    ('["ok", "bad\\nline"]', "--exclude 'bad\\nline' contains a newline"),
    ('["a,b"]', "'a,b' is not a hostname"),
    ('["x; reboot"]', "'x; reboot' is not a hostname"),
    ('["-n1"]', "'-n1' is not a hostname"),
    (json.dumps(["n" * 64]), "at most 63 characters"),
])
def test_bad_exclude_files_are_one_line(tmp_path, capsys, content, needle):
    path = tmp_path / "bad.json"
    if content is not None:
        path.write_text(content)
    for target in ("slurm", "k8s"):
        rc, out, err = launch(capsys, target, "--nodes", "1", "--gpus-per-node", "1", "--exclude", str(path))
        assert rc == 2 and out == ""
        assert err.count("\n") == 1 and err.startswith("error: ") and needle in err, err
