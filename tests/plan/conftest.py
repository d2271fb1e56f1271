import argparse

import pytest


@pytest.fixture
def run_plan(capsys):
    """Run `gigafactory plan ARGS` through its own parser; returns (exit code, stdout)."""
    from gigafactory.cli import plan

    def _run(*argv):
        parser = argparse.ArgumentParser()
        plan.register(parser.add_subparsers())
        args = parser.parse_args(["plan", *argv])
        code = args.func(args)
        return code, capsys.readouterr().out

    return _run
