"""The main job on the embedded default (SmolLM2-135M-Instruct, movie-review sentiment), as `make demo` runs it."""

from __future__ import annotations

import json

import torch

import lorakit as lk
from lorakit.train.job import JobConfig, run_job


def test_default_job_beats_zero_shot(tmp_path):
    # the demo's settings, scored on the first 600 of its 1,200 held-out sentences: half the evaluation time
    cfg = JobConfig.of(steps=60, lr=2e-3, batch_size=16, out=str(tmp_path / "run"), eval_size=600)
    report = run_job(cfg, progress=False)
    assert report.trainable / report.total < 0.01
    assert report.after["accuracy"] >= max(0.85, report.before["accuracy"] + 0.05), (report.before, report.after)
    assert report.after["eval_loss"] < report.before["eval_loss"]
    same, n = report.merged_agreement
    assert same == n
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["q_proj", "v_proj"] and config["task_type"] == "CAUSAL_LM"
    from lorakit.models import load_base_model

    fresh, _ = load_base_model("default")
    lk.load(fresh, tmp_path / "run" / "adapter")  # the saved folder reproduces the trained model
    assert torch.isfinite(next(p for n, p in fresh.named_parameters() if "lora_B" in n)).all()
