"""`gigafactory`: one entry point, one subcommand per part of the mission.

Each command module exposes `register(subparsers)`, which adds its parser and sets `func` to the function that runs
it. Only the module of the command being run is imported (all of them for top-level help or an unknown command), so
`plan` and `simulate` never import torch. A `UserError` anywhere below becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import os
import sys
import time

from gigafactory.errors import UserError

LAUNCHER_KILL_WAIT_S = 10.0  # how long a worker that hit a user error waits for `train --nproc` to stop the job

# Module names under gigafactory/cli/; the subcommand is the name without a trailing underscore (import_ -> import).
COMMANDS = ["train", "generate", "data", "simulate", "plan", "serve", "report", "export", "import_", "launch", "health", "sft", "dpo", "eval", "gateway"]


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (with a did-you-mean for flags) and exit code 2."""

    def error(self, message: str):
        bad = message.rpartition(": ")[2].split()[0] if "unrecognized arguments" in message else ""
        parsers = [self]
        for action in self._actions:  # the top-level parser reports unknown flags of subcommands too
            if isinstance(action, argparse._SubParsersAction):
                parsers += list(action.choices.values())
        known = [opt for p in parsers for action in p._actions for opt in action.option_strings]
        close = difflib.get_close_matches(bad, known, n=1) if bad else []
        hint = f"; did you mean {close[0]}?" if close else f"; see `{self.prog} --help`"
        self.exit(2, f"error: {message}{hint}\n")


def _chosen(argv: list[str]) -> list[str]:
    """The command modules to import: the one named first on the command line, else all (help, typos)."""
    first = argv[0] if argv else ""
    named = [m for m in COMMANDS if m.rstrip("_") == first]
    return named or list(COMMANDS)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser for `argv` (only its command registered), or for every command when argv is None."""
    parser = Parser(
        prog="gigafactory",
        allow_abbrev=False,
        description="Train, plan, simulate and serve Grok-class Mixture-of-Experts models.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS if argv is None else _chosen(argv):
        importlib.import_module(f"gigafactory.cli.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as err:
        if getattr(args, "user_error_file", ""):  # a torchrun worker: the launching process prints it, once
            _write_once(args.user_error_file, str(err))
            # ... and stops the whole job within a fraction of a second. Exiting first would make the other ranks'
            # pending collectives fail with tracebacks of their own before the launcher gets to them.
            time.sleep(LAUNCHER_KILL_WAIT_S)
        else:
            print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _write_once(path: str, text: str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            f.write(text + "\n")
        os.replace(tmp, path)
    except OSError:
        print(text, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
