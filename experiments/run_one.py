"""One run of the study in a process of its own: `python experiments/run_one.py SPEC.json RESULT.json`.

The spec's kind says what runs: "train" (the `lorakit train` job, lorakit.train.job.run_job), "zero-shot"
(the held-out metric of the untrained model), "estimate" (lorakit's memory estimate) or "time" (seconds
per training step). The result is written only when the run finished, so a killed run leaves no result and
is simply run again.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from lorakit import atomic
from lorakit.errors import LorakitError
from lorakit.train.job import JobConfig, evaluate_job, prepare, run_job

REPO = Path(__file__).resolve().parent.parent


def train(spec: dict[str, Any]) -> dict[str, Any]:
    """The job's report; a run whose loss stopped being finite is a result too (a sweep's too-high lr)."""
    try:
        report = run_job(JobConfig.of(**spec["job"]), progress=False, log=lambda message: print(message, flush=True))
    except LorakitError as exc:
        if not str(exc).startswith("loss became"):
            raise
        return {"diverged": str(exc), "after": {}}
    saved = report.model_dir or report.adapter_dir
    history = [{k: v for k, v in h.items() if k in ("step", "loss", "accuracy", "eval_loss")}
               for h in report.train.history]
    return {"trainable": report.trainable, "total": report.total, "after": report.after,
            "peak_rss_mb": report.peak_memory_mb, "train_seconds": report.train.seconds,
            "steps": report.train.steps, "checkpoint_bytes": sum(f.stat().st_size for f in saved.glob("*.safetensors")),
            "n_train": report.n_train, "n_eval": report.n_eval, "merged_agreement": report.merged_agreement,
            "history": history}


def zero_shot(spec: dict[str, Any]) -> dict[str, Any]:
    return {"metrics": evaluate_job(JobConfig.of(**spec["job"]))}


def estimate(spec: dict[str, Any]) -> dict[str, Any]:
    """lorakit's memory estimate of one (method, r, target, seq_len), in bytes by component."""
    from dataclasses import asdict

    from lorakit.train.estimate import estimate as estimate_memory

    request = spec["request"]
    found = estimate_memory(spec["model"], request["method"], request.get("r", 8), request.get("target"),
                            spec["batch_size"], request["seq_len"], spec["precision"])
    return {"estimate": asdict(found), "total": found.total}


def time_steps(spec: dict[str, Any]) -> dict[str, Any]:
    """Seconds of each training step of the job's own trainer (no evaluation, nothing saved)."""
    from lorakit.train.loop import Trainer

    cfg = JobConfig.of(**spec["job"])
    torch.manual_seed(cfg.train.seed)
    model, _, prepared = prepare(cfg, torch.device("cpu"))
    stamps = [time.perf_counter()]
    trainer = Trainer(model, prepared.train, prepared.collate, prepared.loss_fn, cfg.train, None,
                      on_step=lambda step: stamps.append(time.perf_counter()), progress=False)
    trainer.run()
    seconds = [b - a for a, b in zip(stamps, stamps[1:])]
    timed = seconds[spec["warmup"]:]
    return {"step_seconds": seconds, "median_s": statistics.median(timed), "timed_steps": len(timed)}


KINDS = {"train": train, "zero-shot": zero_shot, "estimate": estimate, "time": time_steps}


def host() -> dict[str, Any]:
    """Where and when it ran: the load average says how far its wall times can be trusted (its CPU seconds,
    user + system of all its threads, depend far less on what else runs)."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "cpus": os.cpu_count(), "torch_threads":
            torch.get_num_threads(), "load_average": list(os.getloadavg()), "machine": platform.machine(),
            "torch": torch.__version__, "commit": commit.stdout.strip() or None}


def main(spec_file: str, result_file: str) -> None:
    spec = json.loads(Path(spec_file).read_text())
    started = host()
    start = time.perf_counter()
    result = KINDS[spec["kind"]](spec)
    ended = host()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    record = {"spec": spec, **result, "wall_seconds": time.perf_counter() - start,
              "cpu_seconds": usage.ru_utime + usage.ru_stime, "host": started, "load_average_end": ended["load_average"]}
    atomic.write_text(result_file, json.dumps(record, indent=1, allow_nan=False) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
