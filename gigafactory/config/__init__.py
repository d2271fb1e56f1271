"""The typed config tree: dataclasses with a help string on every field, loaded from TOML and CLI overrides."""
