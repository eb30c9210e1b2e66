"""Option values from files and strings: YAML/TOML option files, index lists like '4,8,12-15', ranges like
'64-256', sizes like '8G'."""

from __future__ import annotations

from pathlib import Path


def read_config(path) -> dict:
    """Option names (dashes become underscores) -> values, from a .toml file or YAML; a list becomes the comma
    list the command line takes (layers: [12, 16] -> '12,16')."""
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
    return {str(k).replace("-", "_"): ",".join(map(str, v)) if isinstance(v, list) else v for k, v in data.items()}


def parse_index_list(text: str) -> list[int]:
    """'4,8,12-15' -> [4, 8, 12, 13, 14, 15]; ValueError names the text when it is not such a list."""
    out = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part:
                lo, hi = part.split("-", 1)
                out += range(int(lo), int(hi) + 1)
            else:
                out.append(int(part))
        except ValueError:
            raise ValueError(f"{text!r} is not a list of integers and ranges like 4,8,12-15") from None
    return out


def parse_range(text) -> tuple[int, int]:
    """'64-256' -> (64, 256); '100' -> (100, 100); ValueError names the text otherwise."""
    try:
        lo, _, hi = str(text).strip().partition("-")
        return int(lo), int(hi or lo)
    except ValueError:
        raise ValueError(f"{text!r} is not a range like 64-256") from None


def parse_budget(text) -> int | None:
    """A memory budget option: a size (bytes, above 0), or 'auto' -> None (the caller sizes it to its device)."""
    if str(text).strip().lower() == "auto":
        return None
    size = parse_size(text)
    if size <= 0:
        raise ValueError(f"{text!r} is not a size above 0, nor auto")
    return size


def parse_size(text) -> int:
    """'512M', '2G', '1.5G', '1073741824' -> bytes; ValueError names the text otherwise."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    clean = str(text).strip().upper().removesuffix("IB").removesuffix("B")
    try:
        return int(float(clean[:-1]) * units[clean[-1]]) if clean[-1:] in units else int(clean)
    except (ValueError, KeyError):
        raise ValueError(f"{text!r} is not a size like 512M or 8G") from None
