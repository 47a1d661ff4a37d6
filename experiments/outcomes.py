"""The study's results as the generator reads them: every JSON file under experiments/results/, loaded once,
with the few questions the tables and figures ask of them."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import study

NOT_RUN = "not run yet"


@dataclass
class Results:
    runs: dict[str, list[dict]] = field(default_factory=dict)  # configuration -> one result per seed
    sweep: dict[str, dict[float, dict]] = field(default_factory=dict)  # method -> lr -> result
    memory: dict[str, list[dict]] = field(default_factory=dict)  # "<config>-len<L>" -> one result per seed
    times: dict[str, dict] = field(default_factory=dict)  # configuration -> time_steps result
    zero_shot: dict | None = None
    estimates: list[dict] = field(default_factory=list)  # one per (configuration, tokens): spec.request, total
    settings: dict[str, Any] = field(default_factory=dict)  # the study's settings (Study.describe)


def load(folder: Path) -> Results:
    found = Results()
    read = lambda path: json.loads(path.read_text())  # noqa: E731
    for path in sorted(folder.glob("*/seed-*.json")):
        found.runs.setdefault(path.parent.name, []).append(read(path))
    for path in sorted(folder.glob("sweep/*/lr-*.json")):
        result = read(path)
        found.sweep.setdefault(path.parent.name, {})[result["spec"]["lr"]] = result
    for path in sorted(folder.glob("memory/*/seed-*.json")):
        found.memory.setdefault(path.parent.name, []).append(read(path))
    for path in sorted(folder.glob("time_steps/*.json")):
        found.times[path.stem] = read(path)
    if (folder / "zero-shot" / "result.json").is_file():
        found.zero_shot = read(folder / "zero-shot" / "result.json")
    found.estimates = [read(path) for path in sorted(folder.glob("estimates/*.json"))]
    found.settings = _one_study(found)
    return found


def _one_study(found: Results) -> dict[str, Any]:
    """The study settings every result was made with (the defaults when there is none); mixed ones are refused."""
    every = [*(r for runs in found.runs.values() for r in runs), *(r for p in found.sweep.values() for r in p.values()),
             *(r for runs in found.memory.values() for r in runs), *found.estimates, *([found.zero_shot] if found.zero_shot else [])]
    seen = {json.dumps(r["spec"]["study"], sort_keys=True) for r in every}
    if len(seen) > 1:
        raise SystemExit(f"the results were made with different study settings: {sorted(seen)}; keep one set")
    return json.loads(seen.pop()) if seen else study.Study().describe()


# ---- numbers ---------------------------------------------------------------------------------------------------
def accuracies(results: Results, name: str) -> list[float]:
    """Held-out accuracy of each finished seed (a diverged one has none; `accuracy_cell` counts those)."""
    return [r["after"]["accuracy"] for r in results.runs.get(name, []) if "accuracy" in r["after"]]


def finished(results: Results, name: str) -> list[dict]:
    """The runs of a configuration that trained to the end (not the diverged ones)."""
    return [r for r in results.runs.get(name, []) if "diverged" not in r]


def first(results: Results, name: str, key: str) -> Any:
    runs = finished(results, name)
    return runs[0][key] if runs else None


def picked_lr(results: Results, method: str) -> tuple[float | None, str]:
    """The lr the sweep picked, as the table commands pick it, and a note when it is the grid's edge."""
    points = results.sweep.get(method, {})
    config = study.sweep_config(method)
    grid = study.LR_GRIDS[config.family]
    if len(points) < len(grid):
        return None, NOT_RUN
    lr = study.best_point(list(points.values()))["spec"]["lr"]
    edge = " (grid edge)" if lr in (min(grid), max(grid)) else ""
    return lr, f"{lr:g}{edge}"
