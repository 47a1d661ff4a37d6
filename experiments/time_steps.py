"""Seconds per training step of every Table 1 method, for the time column of docs/experiments.md.

    python experiments/time_steps.py              # run it on an otherwise idle machine

One process per method, each the job's own trainer on the embedded default's batches (the same batches
for every method): 2 warm-up steps, then the median of the next 6. Step times on a shared, loaded host
are not the library's speed, so this is a separate, short command; it always measures afresh and records
the load average, which docs/experiments.md prints beside the figures.
"""

from __future__ import annotations

import study

WARMUP, TIMED = 2, 6


def main(argv: list[str] | None = None) -> None:
    p = study.parser(__doc__)
    p.set_defaults(seeds="0")
    args = p.parse_args(argv)
    s = study.study_from(args)
    for config in study.selected(study.METHODS, args.only):
        grid = study.LR_GRIDS[config.family]
        job = s.job(s.runs / "time" / config.name, 0, grid[len(grid) // 2], config.settings)
        job |= {"steps": WARMUP + TIMED}
        spec = {"kind": "time", "study": s.describe() | {"steps": WARMUP + TIMED}, "config": config.name,
                "warmup": WARMUP, "job": job}
        result = s.results / "time_steps" / f"{config.name}.json"
        result.unlink(missing_ok=True)
        print(f"time {config.name}", flush=True)
        study.run_child(spec, result)


if __name__ == "__main__":
    main()
