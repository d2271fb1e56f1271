"""`knob()`: a dataclass field that carries its own help text, so --help and docs come from one place."""

from dataclasses import MISSING, field
from typing import Any


def knob(default: Any = MISSING, help: str = "", *, factory: Any = MISSING, choices: tuple = ()) -> Any:
    """A dataclass field with a help string (shown by --help) and optional allowed values."""
    metadata = {"help": help, "choices": choices}
    if factory is not MISSING:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)
