"""The training job end to end on tiny models: every data format, exact resume, two processes, bad data."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import lorakit as lk
from lorakit.cli import app
from lorakit.train.job import JobConfig, prepare, run_job
from lorakit.train.loop import Trainer, TrainSettings
from test_data import CHAT, make_tokenizer, write_jsonl

REVIEWS = [("a moving, funny film", "positive"), ("dull and far too long", "negative"),
           ("the best cast of the year", "positive"), ("a mess from start to end", "negative")] * 8


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny Llama folder with a real (in-memory trained) tokenizer: what `--model` takes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer),
                                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


ROWS = {
    "text": [{"text": f"review: {t}. verdict {label}"} for t, label in REVIEWS],
    "prompt_completion": [{"prompt": f"Review: {t}\nSentiment:", "completion": f" {label}"} for t, label in REVIEWS],
    "messages": [{"messages": CHAT} for _ in range(16)],
    "text_label": [{"text": t, "label": label} for t, label in REVIEWS],
}


def _cfg(tiny_model, data, out, **overrides) -> JobConfig:
    return JobConfig.of(**{"model": tiny_model, "data": str(data), "out": str(out), "steps": 4, "batch_size": 4,
                        "lr": 5e-3, "precision": "fp32", "target": ["q_proj", "v_proj"], **overrides})


@pytest.mark.parametrize("fmt", list(ROWS))
def test_every_format_trains_end_to_end(fmt, tiny_model, tmp_path):
    write_jsonl(tmp_path / "data.jsonl", ROWS[fmt])
    report = run_job(_cfg(tiny_model, tmp_path / "data.jsonl", tmp_path / "run", eval_every=2), progress=False)
    assert report.train.steps == 4 and torch.isfinite(torch.tensor(report.train.final_loss))
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "run" / "curves.png").stat().st_size > 1000
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3, 4]
    metric = "accuracy" if fmt in ("prompt_completion", "text_label") else "eval_loss"
    assert metric in report.after and metric in lines[1]
    if fmt == "text_label":
        saved = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
        assert "base_model.model.score.weight" in saved  # the new head travels with the adapter
    if fmt == "prompt_completion":
        assert report.merged_agreement[0] == report.merged_agreement[1]


def test_training_lowers_the_loss(tiny_model, tmp_path):
    write_jsonl(tmp_path / "data.jsonl", ROWS["prompt_completion"])
    report = run_job(_cfg(tiny_model, tmp_path / "data.jsonl", tmp_path / "run", steps=30, lr=3e-2,
                          target=r".*(proj|lm_head)"), progress=False)  # a random tiny head needs help
    losses = [h["loss"] for h in report.train.history]
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0]
    assert report.after["eval_loss"] < report.before["eval_loss"]


@pytest.mark.parametrize("variant", [{"use_dora": True}, {"use_rslora": True}, {"init": "pissa"}],
                         ids=["dora", "rslora", "pissa"])
def test_variants_train_and_save(variant, tiny_model, tmp_path):
    write_jsonl(tmp_path / "data.jsonl", ROWS["prompt_completion"])
    report = run_job(_cfg(tiny_model, tmp_path / "data.jsonl", tmp_path / "run", **variant), progress=False)
    assert torch.isfinite(torch.tensor(report.train.final_loss))
    saved = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    if "init" in variant:  # converted for the original base: rank 2r
        assert saved["r"] == 16 and saved["init_lora_weights"] is True
    else:
        assert saved[next(iter(variant))] is True
    if "use_dora" in variant:
        assert any(k.endswith("lora_magnitude_vector") for k in load_file(report.adapter_dir / "adapter_model.safetensors"))


def _trainer(tiny_model, data, out, on_step=None):
    cfg = _cfg(tiny_model, data, out, dropout=0.2, save_every=2, steps=7)
    torch.manual_seed(cfg.train.seed)
    model, _, prepared = prepare(cfg, torch.device("cpu"))
    settings = TrainSettings(steps=7, batch_size=4, lr=5e-3, save_every=2, precision="fp32")
    return model, Trainer(model, prepared.train, prepared.collate, prepared.loss_fn, settings, out,
                          on_step=on_step, progress=False)


def test_resume_after_a_kill_ends_with_the_same_adapter(tiny_model, tmp_path):
    write_jsonl(tmp_path / "data.jsonl", ROWS["prompt_completion"][:20])  # 5 steps an epoch: resume crosses one
    straight, trainer = _trainer(tiny_model, tmp_path / "data.jsonl", tmp_path / "straight")
    trainer.run()

    def kill(step):
        if step == 5:
            raise KeyboardInterrupt  # dies after the step-4 checkpoint, mid-way to the next

    _, trainer = _trainer(tiny_model, tmp_path / "data.jsonl", tmp_path / "resumed", on_step=kill)
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    resumed, trainer = _trainer(tiny_model, tmp_path / "data.jsonl", tmp_path / "resumed")
    result = trainer.run(resume=True)
    assert result.steps == 7 and [h["step"] for h in result.history] == list(range(1, 8))
    for (name, a), (_, b) in zip(lk.adapter_state_dict(straight).items(), lk.adapter_state_dict(resumed).items()):
        assert torch.equal(a, b), name


def test_a_batch_loss_is_the_token_weighted_mean_of_its_rows_alone(tiny_model):
    """Left padding must not add targets: the first real token of a padded row is not predicted from a pad."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit.train import data
    from lorakit.train.objectives import causal_lm_loss, target_count

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    rows = [{"text": text} for text in ("a", "dull and far too long, the worst film of the year", "the best cast")]
    examples = data.tokenize(rows, tokenizer, "text", 64).examples
    pad = tokenizer.pad_token_id
    with torch.no_grad():
        total, count = causal_lm_loss(model, data.collate(examples, pad, "left"))
        alone = [causal_lm_loss(model, data.collate([example], pad, "left")) for example in examples]
    assert count == sum(n for _, n in alone) == sum(len(e["input_ids"]) - 1 for e in examples)
    assert count == target_count(data.collate(examples, pad, "left"))
    torch.testing.assert_close(total / count, sum(loss for loss, _ in alone) / count, rtol=1e-6, atol=1e-6)


def test_two_gloo_processes_match_one(tiny_model, tmp_path):
    """Text rows of many lengths: the two processes' batches are padded differently from the one's."""
    write_jsonl(tmp_path / "data.jsonl", [{"text": f"{t} {'and more ' * (i % 5)}"} for i, (t, _) in enumerate(REVIEWS)])
    common = ["train", "--model", tiny_model, "--data", str(tmp_path / "data.jsonl"), "--steps", "3",
              "--batch-size", "8", "--lr", "5e-3", "--precision", "fp32", "--target", "q_proj,v_proj",
              "--eval-every", "0"]
    env = os.environ | {"OMP_NUM_THREADS": "1", "MASTER_PORT": "29517"}
    for name, extra in (("one", []), ("two", ["--nproc", "2"])):
        proc = subprocess.run([sys.executable, "-m", "lorakit", *common, "--out", str(tmp_path / name), *extra],
                              capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    first_loss = [json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[0])["loss"]
                  for name in ("one", "two")]
    assert first_loss[1] == pytest.approx(first_loss[0], rel=1e-6, abs=0)
    one = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    two = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=1e-5, rtol=1e-4)  # Adam amplifies reduction-order noise
    assert any(one[k].abs().sum() > 0 for k in one if "lora_B" in k)


@pytest.mark.parametrize("rows, message", [
    ([{"prompt": "a"}, {"prompt": "b", "completion": "c"}], "data.jsonl line 1 is missing field 'completion'"),
    ([], "empty"),
])
def test_bad_data_gives_a_clear_error(rows, message, tiny_model, tmp_path):
    write_jsonl(tmp_path / "data.jsonl", rows)
    result = CliRunner().invoke(app, ["train", "--model", tiny_model, "--data", str(tmp_path / "data.jsonl"),
                                      "--out", str(tmp_path / "run")])
    assert result.exit_code != 0
    assert message in str(result.exception)
    assert isinstance(result.exception, lk.LorakitError)


def test_config_file_and_flags(tiny_model, tmp_path):
    from lorakit.train.config_file import job_config

    (tmp_path / "run.yaml").write_text("r: 4\nlr: 0.01\ntarget: q_proj,k_proj\ndata: my.jsonl\n")
    (tmp_path / "run.toml").write_text('r = 2\nbatch-size = 32\n')
    cfg = job_config({"steps": 60}, tmp_path / "run.yaml", {"lr": 0.02})
    assert (cfg.lora.r, cfg.train.lr, cfg.lora.target_modules, cfg.train.steps) == (4, 0.02, ["q_proj", "k_proj"], None)
    cfg = job_config({"steps": 60}, tmp_path / "run.toml", {})
    assert (cfg.lora.r, cfg.train.batch_size, cfg.train.steps) == (2, 32, 60)  # default data keeps the demo preset
    (tmp_path / "bad.yaml").write_text("rank: 4\n")
    with pytest.raises(lk.LorakitError, match="unknown setting 'rank'"):
        job_config({}, tmp_path / "bad.yaml", {})


def test_eval_generate_and_qlora_commands(tiny_model, tmp_path):
    write_jsonl(tmp_path / "data.jsonl", ROWS["prompt_completion"])
    run_job(_cfg(tiny_model, tmp_path / "data.jsonl", tmp_path / "run", quantize="nf4"), progress=False)
    runner = CliRunner()
    for extra in ([], ["--adapter", str(tmp_path / "run" / "adapter")],
                  ["--adapter", str(tmp_path / "run" / "adapter"), "--merged"]):
        result = runner.invoke(app, ["eval", "--model", tiny_model, "--data", str(tmp_path / "data.jsonl"),
                                     "--precision", "fp32", *extra])
        assert result.exit_code == 0, result.output  # a QLoRA adapter also serves the 16-bit base
        assert "accuracy" in result.output
    result = runner.invoke(app, ["generate", "Review: a fine film\nSentiment:", "--model", tiny_model,
                                 "--adapter", str(tmp_path / "run" / "adapter"), "--max-new-tokens", "3"])
    assert result.exit_code == 0, result.output
