"""`health --pick` on what a broken node or a careless caller hands it: a report with nonsense fields drops that
node (it never breaks the judgement of the others), a NaN throughput is not a healthy node, a node named twice or a
path instead of a name is a one-line error."""

from __future__ import annotations

import json

import pytest

from gigafactory.errors import UserError
from gigafactory.fleet.select import pick_nodes


def write(tmp_path, node, **fields):
    rank = {"rank": 0, "errors": [], "numerics": "beef", "matmul_tflops": 1.0, **fields}
    (tmp_path / f"{node}.json").write_text(json.dumps({"ranks": [rank]}))


@pytest.mark.parametrize("fields, why", [
    ({"numerics": ["x"]}, "numerics"),
    ({"errors": 5}, "errors"),
    ({"matmul_tflops": float("nan")}, "matmul_tflops = nan"),
    ({"allreduce_node_gbps": "fast"}, "allreduce_node_gbps"),
])
def test_a_malformed_report_drops_its_node_only(tmp_path, fields, why):
    for node in ("n1", "n2", "n3"):
        write(tmp_path, node)
    write(tmp_path, "bad", **fields)
    result = pick_nodes(["bad", "n1", "n2", "n3"], tmp_path, 3, 0.8)
    assert result["chosen"] == ["n1", "n2", "n3"] and why in result["dropped"]["bad"][0]


@pytest.mark.parametrize("candidates, reports, needle", [
    (["n1", "n1"], ".", "names n1 twice"),
    (["../n1", "n2"], ".", "node names, not paths"),
    (["n1", "n2"], "missing", "is not a directory"),
])
def test_bad_pick_input_is_one_line(tmp_path, candidates, reports, needle):
    write(tmp_path, "n1")
    with pytest.raises(UserError, match=needle):
        pick_nodes(candidates, tmp_path / reports, 1, 0.8)
