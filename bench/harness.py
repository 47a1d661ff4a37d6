"""Shared benchmark plumbing: each configuration runs in its own process so peak RSS is its own.

A benchmark script calls `main(CONFIGS, run_config, report)`: with no arguments it spawns itself once per
configuration (`--config NAME`), collects one JSON line from each, and prints a table plus ratios.
`--only` takes names or shell patterns (`--only 'train_*' infer_base_b1`) so related configurations can be
rerun together; the header records the load average, since other jobs on a shared machine skew timings.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import date

import torch


def time_median(step: Callable[[], object], warmup: int, repeats: int) -> float:
    """Median wall seconds of `step` after `warmup` untimed calls."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def round_robin(calls: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Wall seconds of every call in each of `rounds` rounds, one call of each per round after one untimed
    round; the order rotates every round, so neither the host's drift nor the place after another call
    favours one of them."""
    names = list(calls)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(rounds + 1):  # round 0 warms every call up
        turn = round_ % len(names)
        for name in names[turn:] + names[:turn]:
            start = time.perf_counter()
            calls[name]()
            if round_:
                times[name].append(time.perf_counter() - start)
    return times


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def compute_dtype(choice: str = "auto") -> torch.dtype:
    """The compute dtype for `choice`; "auto" is what the demo's precision "auto" trains in on this machine
    (bfloat16, or float32 where bfloat16 would be emulated: CPUs without AVX512-BF16 or AMX)."""
    if choice != "auto":
        return DTYPES[choice]
    from lorakit.train.loop import amp_dtype

    return amp_dtype("auto", torch.device("cuda" if torch.cuda.is_available() else "cpu")) or torch.float32


def add_dtype_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                        help="compute dtype; auto: bfloat16 where the hardware computes it natively, else float32")


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def select(configs: list[str], patterns: list[str] | None) -> list[str]:
    """The configurations named by `patterns` (exact names or fnmatch patterns), in `configs` order."""
    if not patterns:
        return configs
    unmatched = [p for p in patterns if not fnmatch.filter(configs, p)]
    if unmatched:
        sys.exit(f"--only {unmatched} matched no configuration; choose from: {' '.join(configs)}")
    return [c for c in configs if any(fnmatch.fnmatchcase(c, p) for p in patterns)]


def main(configs: list[str], run_config: Callable[[str, argparse.Namespace], dict],
         report: Callable[[dict[str, dict]], None], add_arguments: Callable | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", choices=configs)
    parser.add_argument("--only", nargs="*", default=None, help="run just these configurations (names or patterns)")
    parser.add_argument("--rounds", type=int, default=1, help="run every configuration this many times, interleaved, "
                        "and report the median of the per-process times")
    if add_arguments:
        add_arguments(parser)
    args, passthrough = parser.parse_known_args()
    passthrough = [*passthrough, *_own_options(args, add_arguments)]
    torch.set_num_threads(2)
    if args.config:
        print(json.dumps(run_config(args.config, args) | {"peak_rss_mb": peak_rss_mb()}))
        return
    names = select(configs, args.only)
    runs: dict[str, list[dict]] = {name: [] for name in names}
    load_before, started = os.getloadavg()[0], time.perf_counter()
    for round_ in range(args.rounds):  # interleaved rounds: a drift in machine speed hits every config alike
        for name in names:
            runs[name].append(_run_one(name, passthrough))
            print(f"  [{round_ + 1}/{args.rounds}] {name} (load {os.getloadavg()[0]:.1f}): {runs[name][-1]}",
                  file=sys.stderr, flush=True)
    results = {name: _median_run(found) for name, found in runs.items()}
    print(f"# {sys.argv[0]} on {date.today()} ({machine()}); {time.perf_counter() - started:.0f} s wall, "
          f"1-min load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
    report(results)


def _own_options(args: argparse.Namespace, add_arguments: Callable | None) -> list[str]:
    """The script's own options (add_arguments) as given, for every configuration's process: parsed here, they
    would otherwise reach the children as their defaults."""
    if add_arguments is None:
        return []
    own = argparse.ArgumentParser(add_help=False)
    add_arguments(own)
    forwarded: list[str] = []
    for action in own._actions:
        value = getattr(args, action.dest)
        if value == action.default:
            continue
        flag = action.option_strings[-1]
        values = value if isinstance(value, list) else [] if action.nargs == 0 else [value]
        forwarded += [flag, *map(str, values)]
    return forwarded


def _run_one(name: str, passthrough: list[str]) -> dict:
    """One configuration in a fresh process; its last stdout line is its JSON result."""
    proc = subprocess.run([sys.executable, sys.argv[0], "--config", name, *passthrough],
                          capture_output=True, text=True, check=False)
    if proc.returncode:
        sys.exit(f"configuration {name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _median_run(runs: list[dict]) -> dict:
    """The run whose time is the median over rounds (its other fields stay consistent with it)."""
    if "seconds" not in runs[0]:
        return runs[0]
    return sorted(runs, key=lambda r: r["seconds"])[(len(runs) - 1) // 2] | {"rounds": len(runs)}


def table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, ["-" * w for w in widths], *rows]:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)) + " |")
