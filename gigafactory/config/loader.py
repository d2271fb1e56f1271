"""Build a JobConfig from defaults, a model preset, a TOML file and dotted CLI overrides (in that order).

CLI overrides are flags named after the key: `--model.n_layers 4`, `--optimizer.lr 1e-3`, `--data.inputs a.txt,b.jsonl`.
`[model] preset = "grok-1"` in TOML (or `--preset grok-1`) starts the model section from a preset.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import tomllib
import typing
from pathlib import Path
from typing import Any

from gigafactory.config.job import JobConfig
from gigafactory.models.config import ConfigError, ModelConfig
from gigafactory.models.presets import get_preset


def section_fields(cfg_cls=JobConfig):
    """(section name, section dataclass, its fields) for every section of the tree."""
    hints = typing.get_type_hints(cfg_cls)
    for f in dataclasses.fields(cfg_cls):
        section_cls = hints[f.name]
        yield f.name, section_cls, dataclasses.fields(section_cls), typing.get_type_hints(section_cls)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add --config, --preset and one --section.key flag per config field (help text from the field)."""
    sections = ", ".join(name for name, *_ in section_fields())
    parser.add_argument("--config", metavar="FILE", help=f"TOML config file (sections: {sections}).")
    parser.add_argument("--preset", metavar="NAME", help="Model preset to start from (grok-tiny, grok-1b-moe, grok-20b-moe, grok-1, grok-2, mixtral-tiny).")
    for section, section_cls, fields, hints in section_fields():
        group = parser.add_argument_group(f"{section} ({section_cls.__doc__.strip()})")
        for f in fields:
            kind = _type_name(hints[f.name])
            choices = f.metadata.get("choices")
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            help_text = f"{f.metadata.get('help', '')} [{kind}, default: {default!r}]"
            if choices:
                help_text += f" {{{', '.join(choices)}}}"
            group.add_argument(f"--{section}.{f.name}", dest=f"{section}.{f.name}", metavar=kind.upper(), default=argparse.SUPPRESS, help=help_text)


def load_config(args: argparse.Namespace | None = None, *, config_path: str | None = None, overrides: dict[str, Any] | None = None) -> JobConfig:
    """Resolve the config; raise ConfigError (one line, naming the key and the fix) on any bad value."""
    raw: dict[str, dict[str, Any]] = {}
    config_path = config_path or (getattr(args, "config", None) if args is not None else None)
    if config_path:
        raw = read_toml(config_path)
    preset = getattr(args, "preset", None) if args is not None else None
    cli_values = {k: v for k, v in vars(args).items() if "." in k} if args is not None else {}
    cli_values.update(overrides or {})
    return build_config(raw, cli_values, preset)


def build_config(raw: dict[str, Any], dotted: dict[str, Any], preset: str | None = None) -> JobConfig:
    """Apply a nested dict (from TOML) and then dotted overrides onto the defaults."""
    sections = {name: (cls, {f.name: f for f in fields}, hints) for name, cls, fields, hints in section_fields()}
    merged: dict[str, dict[str, Any]] = {}
    for section, table in raw.items():
        if section not in sections:
            raise ConfigError(f"unknown config section [{section}]{_suggest(section, sections)}")
        if not isinstance(table, dict):
            raise ConfigError(f"config key {section!r} must be a table like [{section}]")
        merged.setdefault(section, {}).update(table)
    for key, value in dotted.items():
        section, _, name = key.partition(".")
        if section not in sections:
            raise ConfigError(f"unknown config key {key!r}{_suggest(section, sections)}")
        merged.setdefault(section, {})[name] = value

    model_table = merged.get("model", {})
    if "preset" in model_table:
        preset = model_table.pop("preset")
    cfg = JobConfig()
    if preset is not None:  # an empty name is an unknown preset, not "no preset"
        if not isinstance(preset, str):
            raise ConfigError(f"config key 'model.preset' expects a preset name, got {preset!r}")
        cfg.model = get_preset(preset)
    for section, values in merged.items():
        cls, fields, hints = sections[section]
        target = getattr(cfg, section)
        for name, value in values.items():
            if name not in fields:
                raise ConfigError(f"unknown config key '{section}.{name}'{_suggest(name, fields, prefix=section + '.')}")
            setattr(target, name, _coerce(f"{section}.{name}", value, hints[name], fields[name].metadata.get("choices")))
    cfg.validate()
    return cfg


def model_config_from_table(table: dict[str, Any], base: ModelConfig | None = None) -> ModelConfig:
    """`base` (default: grok-tiny) with a [model]-style table applied, each value type-checked as --config's are,
    then validated: for tables read from files other than a job config (an export's config.json, --model-config)."""
    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    hints = typing.get_type_hints(ModelConfig)
    values = {}
    for name, value in table.items():
        if name not in fields:
            raise ConfigError(f"unknown model key '{name}'{_suggest(name, fields)}")
        values[name] = _coerce(f"model.{name}", value, hints[name], fields[name].metadata.get("choices"))
    cfg = dataclasses.replace(base or ModelConfig(), **values)
    cfg.validate()
    return cfg


def config_to_toml(cfg: JobConfig) -> str:
    """Serialise a config as TOML that load_config reads back to an equal config."""
    lines = []
    for section, _, fields, _ in section_fields():
        lines.append(f"[{section}]")
        for f in fields:
            lines.append(f"{f.name} = {_toml_value(getattr(getattr(cfg, section), f.name))}")
        lines.append("")
    return "\n".join(lines)


def read_toml(path: str) -> dict:
    p = Path(path).expanduser()
    if p.is_dir():
        raise ConfigError(f"config file {path!r} is a directory; pass a TOML file to --config")
    if not p.is_file():
        raise ConfigError(f"config file {path!r} not found; pass an existing TOML file to --config")
    try:
        return tomllib.loads(p.read_text())
    except OSError as err:
        raise ConfigError(f"config file {path!r} cannot be read ({err.strerror or err}); check the path and its permissions") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {path!r} is not valid TOML ({err}); fix the syntax") from None


def _coerce(key: str, value: Any, kind: Any, choices) -> Any:
    """Convert CLI strings and check TOML types; wrong types name the key and the expected type."""
    expected = _type_name(kind)
    try:
        if kind is bool:
            if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
                value = value.lower() in ("true", "1", "yes")
            if not isinstance(value, bool):
                raise ValueError
        elif kind is int:
            if isinstance(value, str):
                value = int(value)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError
        elif kind is float:
            if isinstance(value, str):
                value = float(value)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError
            value = float(value)
        elif kind is str:
            if not isinstance(value, str):
                raise ValueError
        elif typing.get_origin(kind) is list:
            if isinstance(value, str):
                value = [v for v in value.split(",") if v]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError
    except ValueError:
        raise ConfigError(f"config key '{key}' expects {expected}, got {value!r}") from None
    if kind is float and not math.isfinite(value):
        raise ConfigError(f"config key '{key}' must be a finite number, got {value!r}")
    if choices and value not in choices:
        raise ConfigError(f"config key '{key}'={value!r} is not one of: {', '.join(choices)}")
    return value


def _type_name(kind: Any) -> str:
    if typing.get_origin(kind) is list:
        return "list"
    return getattr(kind, "__name__", str(kind))


def _suggest(name: str, options, prefix: str = "") -> str:
    close = difflib.get_close_matches(name, list(options), n=1)
    return f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid: {', '.join(options)}"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)
