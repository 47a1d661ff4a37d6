"""`--config FILE` (YAML or TOML) merged with presets and command-line flags into one JobConfig."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..errors import LorakitError
from .job_config import JobConfig, coerce, flag_name, setting_types


def job_config(preset: dict[str, Any], path: Path | None, flags: dict[str, Any]) -> JobConfig:
    """Defaults < preset (for the embedded default data) < config file < flags given on the command line.

    The preset's learning rate is an adapter's; full fine-tuning leaves it out and takes its own."""
    from_file = read_config_file(path) if path else {}
    data = flags.get("data", from_file.get("data", "default"))
    values = dict(preset) if data == "default" else {}
    if flags.get("full_finetune", from_file.get("full_finetune")):
        values.pop("lr", None)
    values |= from_file
    values |= flags
    if isinstance(values.get("target"), str):
        values["target"] = parse_targets(values["target"])
    return JobConfig.of(**values)


def read_config_file(path: Path) -> dict[str, Any]:
    """Settings of `lorakit train` by flag name, each coerced to its type (an error names the file and the key)."""
    origin = f"--config {path}"
    hints = setting_types()
    values = {}
    for key, value in parse_settings_file(path).items():
        name = flag_name(key, origin)
        if name in values:
            raise LorakitError(f"{origin}: {key!r} sets {name} a second time; keep one")
        values[name] = coerce(name, value, hints[name], origin)
    return values


def read_settings_file(path: Path, fields: frozenset[str]) -> dict[str, Any]:
    """Another command's settings (dashes read as underscores), uncoerced; a name outside `fields` is an error."""
    values = {str(k).replace("-", "_"): v for k, v in parse_settings_file(path).items()}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise LorakitError(f"--config {path}: unknown settings {unknown}; known: {sorted(fields)}")
    return values


def parse_settings_file(path: Path) -> dict[str, Any]:
    """The top-level mapping of a YAML or TOML file, as written."""
    origin = f"--config {path}"
    if not path.is_file():
        raise LorakitError(f"{origin}: no such file")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            import tomllib

            raw = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(text) or {}
        else:
            raise LorakitError(f"{origin}: use a .yaml, .yml or .toml file")
    except LorakitError:
        raise
    except Exception as exc:  # the parsers raise their own error types
        raise LorakitError(f"{origin}: cannot parse it ({exc})") from None
    if not isinstance(raw, dict):
        raise LorakitError(f"{origin}: expected a mapping of settings, got {type(raw).__name__}")
    return raw


def parse_targets(text: str) -> list[str] | str:
    """"q_proj,v_proj" -> a list of names; "all-linear" and regular expressions stay strings."""
    if text == "all-linear" or re.search(r"[\\^$*+?()\[\]{}|]", text):
        return text
    return [t.strip() for t in text.split(",") if t.strip()]
