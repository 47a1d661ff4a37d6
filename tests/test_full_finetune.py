"""Full fine-tuning in the training job (`lorakit train --full-finetune`): every weight trains, the whole model
is saved, and one step equals a plain PyTorch AdamW step on the transformers model's own loss."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from lorakit.cli import app
from lorakit.errors import LorakitError
from lorakit.train.config_file import job_config
from lorakit.train.job import JobConfig, prepare, run_job
from lorakit.train.job_config import FULL_FINETUNE_LR
from test_data import write_jsonl
from test_train import ROWS, tiny_model  # noqa: F401 - the fixture


def _cfg(model, data, out, **overrides) -> JobConfig:
    return JobConfig.of(**{"model": model, "data": str(data), "out": str(out), "steps": 2, "batch_size": 4,
                           "precision": "fp32", "full_finetune": True, **overrides})


def test_full_finetune_trains_and_saves_every_weight(tiny_model, tmp_path):  # noqa: F811
    from transformers import AutoModelForCausalLM

    write_jsonl(tmp_path / "data.jsonl", ROWS["prompt_completion"])
    report = run_job(_cfg(tiny_model, tmp_path / "data.jsonl", tmp_path / "run", lr=1e-3), progress=False)
    assert report.trainable == report.total and report.adapter_dir is None and report.merged_agreement is None
    assert (report.model_dir / "model.safetensors").is_file() and (report.model_dir / "tokenizer.json").is_file()
    before = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    after = AutoModelForCausalLM.from_pretrained(report.model_dir).state_dict()
    assert set(before) == set(after)
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert "lm_head.weight" in changed and "model.layers.0.mlp.down_proj.weight" in changed
    assert "accuracy" in report.before and "accuracy" in report.after


def test_one_step_equals_plain_pytorch_adamw(tiny_model, tmp_path):  # noqa: F811
    """The reference: transformers' own causal-LM loss, clip_grad_norm_ and torch.optim.AdamW on one row."""
    from transformers import AutoModelForCausalLM

    write_jsonl(tmp_path / "data.jsonl", ROWS["prompt_completion"][:1])
    write_jsonl(tmp_path / "eval.jsonl", ROWS["prompt_completion"][1:3])
    cfg = _cfg(tiny_model, tmp_path / "data.jsonl", tmp_path / "run", eval_data=str(tmp_path / "eval.jsonl"),
               steps=1, batch_size=1, lr=1e-3, eval_before=False)
    report = run_job(cfg, progress=False)
    _, _, prepared = prepare(cfg, torch.device("cpu"))
    example = prepared.train[0]
    reference = AutoModelForCausalLM.from_pretrained(tiny_model)
    reference.train()
    loss = reference(input_ids=torch.tensor([example["input_ids"]]), labels=torch.tensor([example["labels"]])).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
    optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-3, weight_decay=0.0)
    optimizer.step()
    trained = AutoModelForCausalLM.from_pretrained(report.model_dir).state_dict()
    assert report.train.history[0]["loss"] == pytest.approx(loss.item(), rel=1e-5)
    for name, value in reference.state_dict().items():
        # Adam's first step moves each weight by about lr·g/(|g| + eps); where g is near eps that ratio is
        # sensitive to the last bits of g, so agreement is asked to 1% of one step.
        torch.testing.assert_close(trained[name], value, rtol=0, atol=1e-5, msg=name)


def test_full_finetune_settings():
    cfg = JobConfig.of(full_finetune=True)
    assert cfg.train.lr == FULL_FINETUNE_LR and "r" not in cfg.settings()
    assert JobConfig.of(full_finetune=True, lr=1e-4).train.lr == 1e-4
    assert job_config({"steps": 60, "lr": 2e-3}, None, {"full_finetune": True}).train.lr == FULL_FINETUNE_LR
    assert job_config({"steps": 60, "lr": 2e-3}, None, {}).train.lr == 2e-3
    with pytest.raises(LorakitError, match="--r, --target set up an adapter"):
        JobConfig.of(**{"full-finetune": True, "r": 4, "target": "q_proj"})
    with pytest.raises(LorakitError, match="--lora-plus-ratio"):
        JobConfig.of(full_finetune=True, lora_plus_ratio=4.0)
    with pytest.raises(LorakitError, match="drop --quantize"):
        JobConfig.of(full_finetune=True, quantize="nf4")


def test_cli_full_finetune_without_evaluation_before(tiny_model, tmp_path):  # noqa: F811
    write_jsonl(tmp_path / "data.jsonl", ROWS["prompt_completion"])
    result = CliRunner().invoke(app, ["train", "--model", tiny_model, "--data", str(tmp_path / "data.jsonl"),
                                      "--out", str(tmp_path / "run"), "--steps", "1", "--batch-size", "4",
                                      "--precision", "fp32", "--full-finetune", "--no-eval-before"])
    assert result.exit_code == 0, result.output
    assert "full fine-tuning" in result.output and "evaluating before" not in result.output
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    again = CliRunner().invoke(app, ["train", "--model", tiny_model, "--data", str(tmp_path / "data.jsonl"),
                                     "--out", str(tmp_path / "run"), "--steps", "1", "--full-finetune", "--overwrite"])
    assert again.exit_code == 0, again.output  # a run folder holding model/ is a lorakit run
