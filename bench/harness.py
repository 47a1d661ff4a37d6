"""Shared benchmark plumbing: each configuration runs in its own process so peak RSS is its own.

A benchmark script calls `main(CONFIGS, run_config)`: with no arguments it spawns itself once per
configuration (`--config NAME`), collects one JSON line from each, and prints a table plus ratios.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import date
from typing import Callable

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


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def main(configs: list[str], run_config: Callable[[str, argparse.Namespace], dict],
         report: Callable[[dict[str, dict]], None], add_arguments: Callable | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", choices=configs)
    parser.add_argument("--only", nargs="*", default=None, help="run just these configurations")
    if add_arguments:
        add_arguments(parser)
    args, passthrough = parser.parse_known_args()
    torch.set_num_threads(2)
    if args.config:
        print(json.dumps(run_config(args.config, args) | {"peak_rss_mb": peak_rss_mb()}))
        return
    results = {}
    for name in args.only or configs:
        proc = subprocess.run([sys.executable, sys.argv[0], "--config", name, *passthrough],
                              capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"configuration {name} failed:\n{proc.stderr[-3000:]}")
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"  {name}: {results[name]}", file=sys.stderr, flush=True)
    print(f"# {sys.argv[0]} on {date.today()} ({machine()})")
    report(results)


def table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, ["-" * w for w in widths], *rows]:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)) + " |")
