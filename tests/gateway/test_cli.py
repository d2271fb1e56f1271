"""`gigafactory gateway --check` validates the TOML and prints the fleet; mistakes are one UserError line.
(Through its own parser: cli/main.py's COMMANDS gains "gateway" separately.)"""

from __future__ import annotations

import argparse

import pytest

from gigafactory.cli import gateway
from gigafactory.errors import UserError

TOML = """
[[replicas]]
url = "http://10.0.0.1:8000"
region = "EU"
pool = "grok-v1"
[[replicas]]
url = "http://10.0.0.2:8000"
region = "EU"
pool = "grok-v2"
[regions.EU]
fallback = "grok-v1"
[[regions.EU.phases]]
pool = "grok-v2"
percent = 5
[[regions.EU.phases]]
pool = "grok-v2"
percent = 50
"""


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    gateway.register(parser.add_subparsers())
    return parser.parse_args(["gateway", *argv])


def test_check_prints_the_fleet_and_rollout(tmp_path, capsys):
    (tmp_path / "g.toml").write_text(TOML)
    args = parse("--config", str(tmp_path / "g.toml"), "--check")
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "2 replica(s) in pools grok-v1, grok-v2" in out
    assert "region EU: 2 replica(s); phases grok-v2@5%, grok-v2@50%; fallback grok-v1" in out


@pytest.mark.parametrize("argv, message", [
    (("--config", "missing.toml", "--check"), "file not found"),
    (("--config", "{dir}/g.toml", "--port", "70000"), "--port 70000 must be in 0..65535"),
])
def test_bad_flags_are_one_line(tmp_path, argv, message):
    (tmp_path / "g.toml").write_text(TOML)
    args = parse(*(a.format(dir=tmp_path) for a in argv))
    with pytest.raises(UserError, match=message):
        args.func(args)
