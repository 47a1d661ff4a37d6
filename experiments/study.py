"""The study behind docs/experiments.md: what every run shares, the configurations of its tables, the
learning-rate sweep, and running (configuration, seed) pairs resumably.

Each run is one process (experiments/run_one.py), so the peak RSS it reports is its own, and writes one JSON
file under results/; a run whose file exists with the same settings is skipped, so any table's command can
be stopped and started again. A file written with other settings is an error, never silently reused.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
QV = ["q_proj", "v_proj"]
ALPHA = 16  # fixed while the rank varies, as the LoRA paper does (alpha = the first r tried, never tuned)
# One identical sweep for every method: three learning rates half a decade apart around the family's usual
# value; full fine-tuning moves every weight and needs steps about 30x smaller than an adapter.
LR_GRIDS = {"adapter": (3e-4, 1e-3, 3e-3), "full": (1e-5, 3e-5, 1e-4)}


@dataclass(frozen=True)
class Study:
    """What every run shares; the defaults are the study of docs/experiments.md."""

    model: str = "default"
    data: str = "default"  # "default" (the embedded sentences) or a prompt/completion .jsonl
    eval_data: str | None = None  # the held-out rows when `data` is a file
    # 30 steps of 16 (half the demo's 60) keep the whole study, 3 seeds of every configuration plus the
    # sweeps, near 2 hours on 2 CPU cores; docs/experiments.md shows whether the loss had flattened.
    steps: int = 30
    batch_size: int = 16
    seeds: tuple[int, ...] = (0, 1, 2)
    val_size: int = 300  # validation rows carved from the training rows for the lr sweep
    sweep_evals: int = 2  # validation accuracy this many times during each sweep run (the curves)
    precision: str = "auto"
    results: Path = HERE / "results"
    runs: Path = HERE / "runs"
    lr: float | None = None  # given: skip the sweep and use it for every method (smoke tests)

    def job(self, out: Path, seed: int, lr: float, settings: dict[str, Any]) -> dict[str, Any]:
        """The `lorakit train` settings of one run on the training rows, evaluated on the held-out ones."""
        data = {"data": self.data} | ({"eval_data": self.eval_data} if self.eval_data else {})
        return {"model": self.model, **data, "out": here(out), "steps": self.steps, "batch_size": self.batch_size,
                "lr": lr, "seed": seed, "precision": self.precision, "eval_before": False, "overwrite": True,
                **settings}

    def describe(self) -> dict[str, Any]:
        """What makes results comparable (paths excluded)."""
        return {"model": self.model, "data": self.data, "eval_data": self.eval_data, "steps": self.steps,
                "batch_size": self.batch_size, "val_size": self.val_size, "precision": self.precision}


@dataclass(frozen=True)
class Config:
    """One configuration: its job settings and the method whose swept learning rate it trains with."""

    name: str
    label: str
    settings: dict[str, Any] = field(default_factory=dict)
    method: str = "lora-qv-r8"  # the sweep that sets its lr
    family: str = "adapter"  # which LR_GRIDS entry that sweep uses


def lora(name: str, label: str, r: int, target: list[str] | str, method: str = "lora-qv-r8", **extra: Any) -> Config:
    return Config(name, label, {"r": r, "alpha": ALPHA, "target": target, **extra}, method)


# Table 1: every method at its own swept lr (the name of each is its own sweep).
METHODS = [
    Config("full", "full fine-tuning", {"full_finetune": True}, "full", "full"),
    lora("lora-qv-r8", "LoRA r=8 q,v", 8, QV),
    lora("lora-all-r8", "LoRA r=8 all linear", 8, "all-linear", "lora-all-r8"),
    lora("dora-qv-r8", "DoRA r=8 q,v", 8, QV, "dora-qv-r8", use_dora=True),
    lora("pissa-qv-r8", "PiSSA r=8 q,v", 8, QV, "pissa-qv-r8", init="pissa"),
    lora("qlora-all-r8", "QLoRA NF4+DQ r=8 all linear", 8, "all-linear", "qlora-all-r8", quantize="nf4"),
    lora("rslora-qv-r64", "rsLoRA r=64 q,v", 64, QV, "rslora-qv-r64", use_rslora=True),
]
# Table 2: the rank on q,v at LoRA's lr (paper Table 6).
RANKS = (1, 2, 4, 8, 16, 32, 64)
RANK_SWEEP = [lora(f"lora-qv-r{r}", f"r={r}", r, QV) for r in RANKS]
# Table 3: one parameter budget spread over weight types at LoRA's lr (paper Table 5).
BUDGET = [lora("lora-q-r8", "q at r=8", 8, ["q_proj"]), lora("lora-v-r8", "v at r=8", 8, ["v_proj"]),
          lora("lora-qv-r4", "q,v at r=4", 4, QV),
          lora("lora-qkvo-r2", "q,k,v,o at r=2", 2, ["q_proj", "k_proj", "v_proj", "o_proj"])]


def sweep_config(method: str) -> Config:
    """The configuration a method's lr sweep trains (each method sweeps as itself)."""
    return next(c for c in METHODS if c.method == method)


# ---- command line ------------------------------------------------------------------------------------------
def parser(description: str) -> argparse.ArgumentParser:
    """The options every table command shares (defaults: the study of docs/experiments.md)."""
    p = argparse.ArgumentParser(description=description)
    default = Study()
    p.add_argument("--model", default=default.model, help="'default' or a Hugging Face folder")
    p.add_argument("--data", default=default.data, help="'default' or a prompt/completion .jsonl")
    p.add_argument("--eval-data", default=None, help="held-out .jsonl (needed with a --data file)")
    p.add_argument("--steps", type=int, default=default.steps)
    p.add_argument("--batch-size", type=int, default=default.batch_size)
    p.add_argument("--seeds", default=",".join(map(str, default.seeds)), help="comma list")
    p.add_argument("--val-size", type=int, default=default.val_size)
    p.add_argument("--precision", default=default.precision)
    p.add_argument("--results", type=Path, default=default.results, help="where the JSON results go")
    p.add_argument("--runs", type=Path, default=default.runs, help="run folders (large, not committed)")
    p.add_argument("--only", default=None, help="comma list of configuration names to run")
    p.add_argument("--lr", type=float, default=None, help="skip the sweep: this lr for every method (tests)")
    return p


def study_from(args: argparse.Namespace) -> Study:
    if args.data != "default" and not args.eval_data:
        raise SystemExit("--data FILE needs --eval-data FILE (the held-out rows)")
    seeds = tuple(int(s) for s in args.seeds.split(",") if s.strip())
    model, data, eval_data = (_path_or_name(v) for v in (args.model, args.data, args.eval_data))
    return Study(model, data, eval_data, args.steps, args.batch_size, seeds, args.val_size,
                 precision=args.precision, results=args.results.resolve(), runs=args.runs.resolve(), lr=args.lr)


def _path_or_name(value: str | None) -> str | None:
    """An existing path made absolute (runs start in the repository), anything else ('default') as given."""
    return str(Path(value).resolve()) if value and Path(value).exists() else value


def selected(configs: list[Config], only: str | None) -> list[Config]:
    if not only:
        return configs
    names = only.split(",")
    unknown = sorted(set(names) - {c.name for c in configs})
    if unknown:
        raise SystemExit(f"--only: unknown configurations {unknown}; known: {[c.name for c in configs]}")
    return [c for c in configs if c.name in names]


# ---- running -----------------------------------------------------------------------------------------------
def run_child(spec: dict[str, Any], result: Path) -> dict[str, Any]:
    """Run one spec in its own process (run_one.py) unless `result` already holds it; returns the result.

    A result made with other settings is refused: the study never mixes settings silently."""
    if result.is_file():
        done = json.loads(result.read_text())
        if comparable(done.get("spec", {})) != comparable(spec):
            raise SystemExit(f"{result} was made with other settings than this command's; move it away (or pass "
                             f"another --results) to run it again. Recorded: {done.get('spec')}; now: {spec}")
        print(f"  done before: {result.relative_to(result.parents[2])}")
        return done
    result.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix="lorakit-study-", suffix=".json")
    spec_file = Path(name)
    start = time.time()
    print(f"  running: {result.relative_to(result.parents[2])}", flush=True)
    try:
        with os.fdopen(handle, "w") as out:
            out.write(json.dumps(spec, indent=1))
        spawn(spec_file, result)
    finally:
        spec_file.unlink(missing_ok=True)
    done = json.loads(result.read_text())
    print(f"    {summary(done)} ({time.time() - start:.0f} s)", flush=True)
    return done


def spawn(spec_file: Path, result: Path) -> None:
    """`python experiments/run_one.py SPEC RESULT` in the repository, with this checkout's lorakit first."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]))
    subprocess.run([sys.executable, str(HERE / "run_one.py"), str(spec_file), str(result)], check=True, env=env,
                   cwd=REPO)


def comparable(spec: dict[str, Any]) -> dict[str, Any]:
    """A spec without where its files lie: a result stays valid in another checkout or runs folder."""
    job = {k: v for k, v in spec.get("job", {}).items() if k not in ("out", "data", "eval_data")}
    return spec | {"job": job}


def here(path: Path) -> str:
    """`path` relative to the repository when inside it (results then read the same in any checkout)."""
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def summary(result: dict[str, Any]) -> str:
    if "median_s" in result:
        return f"median {result['median_s']:.3f} s per step"
    if "diverged" in result:
        return result["diverged"]
    metrics = result.get("after") or result.get("metrics") or {}
    shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
    return shown + (f", peak RSS {result['peak_rss_mb']:,.0f} MB" if "peak_rss_mb" in result else "")


def train(study: Study, config: Config, seed: int) -> dict[str, Any]:
    """One (configuration, seed) of a table: trained on all training rows, scored on the held-out ones."""
    lr = tuned_lr(study, config.method, config.family)
    out = study.runs / config.name / f"seed-{seed}"
    spec = {"kind": "train", "study": study.describe(), "config": config.name, "seed": seed, "lr": lr,
            "job": study.job(out, seed, lr, config.settings)}
    return run_child(spec, study.results / config.name / f"seed-{seed}.json")


def run_table(study: Study, configs: list[Config]) -> None:
    """Every configuration with every seed, seed by seed: an interrupted table already has one full pass."""
    for seed in study.seeds:
        for config in configs:
            print(f"{config.name} seed {seed}", flush=True)
            train(study, config, seed)


# ---- the learning-rate sweep -------------------------------------------------------------------------------
def tuned_lr(study: Study, method: str, family: str) -> float:
    """The lr of `method`: the best validation accuracy of its sweep (ties: lower validation loss)."""
    if study.lr is not None:
        return study.lr
    results = [sweep_run(study, method, lr) for lr in LR_GRIDS[family]]
    return best_point(results)["spec"]["lr"]


def sweep_run(study: Study, method: str, lr: float) -> dict[str, Any]:
    """One point of a sweep: seed 0, the training rows minus the validation ones, scored on those."""
    train_file, val_file = validation_split(study)
    config = sweep_config(method)
    out = study.runs / "sweep" / method / f"lr-{lr:g}"
    every = max(1, study.steps // study.sweep_evals)
    job = study.job(out, 0, lr, config.settings) | {"data": here(train_file), "eval_data": here(val_file),
                                                   "eval_every": every}
    spec = {"kind": "train", "study": study.describe(), "config": config.name, "seed": 0, "lr": lr, "job": job,
            "sweep": True}
    print(f"sweep {method} lr {lr:g}", flush=True)
    return run_child(spec, study.results / "sweep" / method / f"lr-{lr:g}.json")


def validation_split(study: Study) -> tuple[Path, Path]:
    """(training rows minus validation, validation rows) as .jsonl files; the held-out rows are never used."""
    folder = study.runs / "sweep-data"
    train_file, val_file = folder / "train.jsonl", folder / "validation.jsonl"
    rows = training_rows(study)
    if study.val_size >= len(rows):
        raise SystemExit(f"--val-size {study.val_size} leaves no training rows (there are {len(rows)})")
    texts = ["".join(json.dumps(r) + "\n" for r in part) for part in (rows[study.val_size:], rows[:study.val_size])]
    folder.mkdir(parents=True, exist_ok=True)
    for path, text in zip((train_file, val_file), texts):
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)
    return train_file, val_file


def training_rows(study: Study) -> list[dict[str, str]]:
    """The training rows in a fixed shuffled order (the default data's split already is one)."""
    if study.data == "default":
        from lorakit.train import sentiment

        train, _ = sentiment.load_splits(seed=0)
        return [{"prompt": e.prompt, "completion": e.answer} for e in train]
    import random

    rows = [json.loads(line) for line in Path(study.data).read_text().splitlines() if line.strip()]
    random.Random(0).shuffle(rows)
    return rows


def best_point(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The sweep result with the best validation accuracy; ties go to the lower validation loss."""
    finished = [r for r in results if "accuracy" in r["after"]]
    if not finished:
        raise SystemExit(f"every point of the sweep diverged ({results[0]['spec']['config']}); widen LR_GRIDS")
    return max(finished, key=lambda r: (r["after"]["accuracy"], -r["after"].get("eval_loss", 0.0)))


# ---- statistics the generator shares -----------------------------------------------------------------------
def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))

