"""`--config FILE` (YAML or TOML) merged with presets and command-line flags into one JobConfig."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from ..errors import LorakitError
from .job import JobConfig

FIELDS = {f.name for f in dataclasses.fields(JobConfig)}


def job_config(preset: dict[str, Any], path: Path | None, flags: dict[str, Any]) -> JobConfig:
    """Defaults < preset (for the embedded default data) < config file < flags given on the command line."""
    from_file = read_config_file(path) if path else {}
    data = flags.get("data", from_file.get("data", "default"))
    values = dict(preset) if data == "default" else {}
    values |= from_file
    values |= flags
    if isinstance(values.get("target"), str):
        values["target"] = parse_targets(values["target"])
    return JobConfig(**values)


def read_config_file(path: Path, fields: frozenset[str] | set[str] = frozenset(FIELDS)) -> dict[str, Any]:
    """The file's settings (dashes read as underscores); any name outside `fields` is an error naming it."""
    if not path.is_file():
        raise LorakitError(f"--config {path}: no such file")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            import tomllib

            raw = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(text) or {}
        else:
            raise LorakitError(f"--config {path}: use a .yaml, .yml or .toml file")
    except LorakitError:
        raise
    except Exception as exc:  # the parsers raise their own error types
        raise LorakitError(f"--config {path}: cannot parse it ({exc})") from None
    if not isinstance(raw, dict):
        raise LorakitError(f"--config {path}: expected a mapping of settings, got {type(raw).__name__}")
    values = {str(k).replace("-", "_"): v for k, v in raw.items()}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise LorakitError(f"--config {path}: unknown settings {unknown}; known: {sorted(fields)}")
    return values


def parse_targets(text: str) -> list[str] | str:
    """"q_proj,v_proj" -> a list of names; "all-linear" and regular expressions stay strings."""
    if text == "all-linear" or re.search(r"[\\^$*+?()\[\]{}|]", text):
        return text
    return [t.strip() for t in text.split(",") if t.strip()]
