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
