"""Read a YAML or TOML options file into a dict of option names (dashes become underscores)."""

from __future__ import annotations

from pathlib import Path


def read_config(path) -> dict:
    path = Path(path)
    text = path.read_text()
    if path.suffix in (".toml", ".tml"):
        import tomllib

        data = tomllib.loads(text)
    else:
        import yaml

        data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}
