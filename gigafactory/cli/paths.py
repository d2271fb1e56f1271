"""argparse types for output paths, so a directory or an empty name is a usage error, not a surprise file."""

from __future__ import annotations

import argparse
from pathlib import Path


def png_file(text: str) -> str:
    """A PNG to write: refuses an existing directory and an empty name; adds `.png` when the name has no such suffix
    (matplotlib would add it silently, and the command would then name a file it did not write)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty file name; give a path such as plot.png")
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"'{text}' is a directory; give a file path such as {path / 'plot.png'}")
    return text if path.suffix.lower() == ".png" else text + ".png"


def _writable_dir(path: Path, text: str) -> None:
    """Refuse a path whose nearest existing ancestor is a file (mkdir of it would fail after the work is done)."""
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise argparse.ArgumentTypeError(f"'{text}': '{parent}' is a file, not a directory")
            return


def json_file(text: str) -> str:
    """A results JSON to write (a .md table goes beside it): refuses a directory, an empty name, and a name that
    does not end in .json (the table's name would be the JSON's own, overwriting it), before any slow work; "" = not
    given (the command's default)."""
    if not text:  # not given: the command's default
        return text
    path = Path(text).expanduser()
    if not text.strip() or path.is_dir() or path.suffix.lower() != ".json":
        raise argparse.ArgumentTypeError(f"'{text}' is not a .json file path; give one such as results/eval.json")
    _writable_dir(path, text)
    return text


def out_dir(text: str) -> str:
    """A directory to write files into (created if missing): refuses an existing file; "" = not given."""
    if not text:
        return text
    path = Path(text).expanduser()
    if not text.strip() or (path.exists() and not path.is_dir()):
        raise argparse.ArgumentTypeError(f"'{text}' is not a directory (it is a file or empty); give a directory path")
    _writable_dir(path / "x", text)
    return text
