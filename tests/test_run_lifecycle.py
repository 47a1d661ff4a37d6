"""`lorakit train` and `merge` on reused, locked, unwritable and full folders, and bad settings: each a clear
error before any model loads, and never a lost or mixed run."""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import subprocess
import sys
import time

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import lorakit as lk
from lorakit.cli import app
from lorakit.train import job, run_folder
from lorakit.train.job import JobConfig, run_job
from lorakit.train.loop import Trainer, TrainSettings
from lorakit.train.metrics import strict_json
from test_data import write_jsonl
from test_train import ROWS, _cfg, tiny_model  # noqa: F401  (tiny_model is a fixture)

NOT_A_MODEL = "/nonexistent/model"  # a run that got as far as loading a model would fail on this instead


@pytest.fixture(scope="module")
def finished_run(tiny_model, tmp_path_factory):
    """A run of 2 steps with checkpoints; tests that change it make their own."""
    folder = tmp_path_factory.mktemp("finished")
    write_jsonl(folder / "data.jsonl", ROWS["prompt_completion"])
    cfg = _cfg(tiny_model, folder / "data.jsonl", folder / "run", steps=2, save_every=1)
    run_job(cfg, progress=False)
    return cfg


def _again(cfg: JobConfig, **changes) -> JobConfig:
    return JobConfig.of(**(cfg.settings() | changes))


def test_a_second_run_into_a_used_out_is_refused_and_overwrite_replaces_it(finished_run, tmp_path):
    first = _again(finished_run, out=str(tmp_path / "run"))
    run_job(first, progress=False)
    with pytest.raises(lk.LorakitError, match="already holds a run started .*--resume to continue it, --overwrite"):
        run_job(_again(first, model=NOT_A_MODEL), progress=False)
    run_job(_again(first, overwrite=True, steps=3), progress=False)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]  # the earlier run's lines are gone, not mixed


@pytest.mark.parametrize("change, named", [({"r": 4}, "r: was 8, now 4"), ({"lr": 1e-3}, "lr: was 0.005, now 0.001"),
                                           ({"batch_size": 8}, "batch_size: was 4, now 8"),
                                           ({"steps": 1}, "steps: was 2, now 1")])
def test_resume_refuses_another_job_naming_what_differs(change, named, finished_run, tmp_path):
    with pytest.raises(lk.LorakitError, match=named):
        run_job(_again(finished_run, resume=True, **change), progress=False)


def test_resume_refuses_changed_data(finished_run, tmp_path):
    write_jsonl(tmp_path / "data.jsonl", ROWS["prompt_completion"][:-1])
    with pytest.raises(lk.LorakitError, match="data_sha256: was"):
        run_job(_again(finished_run, resume=True, data=str(tmp_path / "data.jsonl")), progress=False)


def test_trainer_resume_refuses_other_settings(tiny_model, tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["0"]))
    examples = [torch.randn(4) for _ in range(8)]
    collate = lambda rows: {"x": torch.stack(rows), "labels": torch.zeros(len(rows)),  # noqa: E731
                            "attention_mask": torch.ones(len(rows), 4)}
    loss = lambda m, b: (m(b["x"]).square().sum(), len(b["x"]))  # noqa: E731
    Trainer(model, examples, collate, loss, TrainSettings(steps=2, batch_size=4, save_every=1), tmp_path,
            progress=False).run()
    with pytest.raises(lk.LorakitError, match="lr: was 0.0002, now 0.001"):
        Trainer(model, examples, collate, loss, TrainSettings(steps=2, batch_size=4, lr=1e-3), tmp_path,
                progress=False).run(resume=True)
    with pytest.raises(lk.LorakitError, match="already holds metrics.jsonl of an earlier run"):
        Trainer(model, examples, collate, loss, TrainSettings(steps=2, batch_size=4), tmp_path, progress=False).run()


def test_a_diverged_loss_is_strict_json_in_the_metrics(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["0"]))
    collate = lambda rows: {"x": torch.stack(rows), "labels": torch.zeros(len(rows)),  # noqa: E731
                            "attention_mask": torch.ones(len(rows), 4)}
    nan_loss = lambda m, b: (m(b["x"]).sum() * float("nan"), len(b["x"]))  # noqa: E731
    trainer = Trainer(model, [torch.randn(4)] * 4, collate, nan_loss, TrainSettings(steps=3, batch_size=2), tmp_path,
                      progress=False)
    with pytest.raises(lk.LorakitError, match="loss became nan at step 1"):
        trainer.run()
    line = (tmp_path / "metrics.jsonl").read_text().splitlines()[0]
    record = json.loads(line, parse_constant=pytest.fail)
    assert record["loss"] is None and record["nonfinite"] == ["loss"]
    assert json.loads(strict_json({"a": math.inf, "b": 1.0})) == {"a": None, "b": 1.0, "nonfinite": ["a"]}


_HOLD_LOCK = """
import sys, time
from pathlib import Path
from lorakit.train.run_folder import RunLock
RunLock(Path(sys.argv[1])).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_train_on_the_same_out_fails_at_once_naming_the_holder(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        start = time.monotonic()
        holder_named = rf"in use by another `lorakit train` \(pid {holder.pid} on .*started"
        with pytest.raises(lk.LorakitError, match=holder_named):
            run_folder.open_run(out, {"model": "m"}, resume=False, overwrite=False)
        assert time.monotonic() - start < 5
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    said = []
    lock = run_folder.open_run(out, {"model": "m"}, resume=False, overwrite=False, say=said.append)
    lock.release()
    assert any(f"pid {holder.pid}" in message and "took over" in message for message in said)


def test_leftovers_of_interrupted_writes_are_removed_at_the_next_start(finished_run):
    out = finished_run.out
    leftovers = [os.path.join(out, "checkpoints", ".step-4.new-abc123"), os.path.join(out, ".adapter.new-x1y2z3"),
                 os.path.join(out, "checkpoints", ".step-6.q8w7e6r5"),  # as lorakit 0.1.0 named them
                 os.path.join(out, ".metrics.jsonl.k2j3.tmp")]
    for path in leftovers[:3]:
        os.makedirs(path)
    open(leftovers[3], "w").close()
    said = []
    lock = run_folder.open_run(Path(out),
                               run_folder.describe_job(finished_run.settings()), resume=True, overwrite=False,
                               say=said.append)
    lock.release()
    assert not any(os.path.exists(path) for path in leftovers)
    assert any("removed 4 leftovers" in message for message in said)


@pytest.mark.parametrize("kind", ["file", "under-a-file", "read-only"])
def test_an_unwritable_out_fails_before_the_model_loads(kind, tmp_path, monkeypatch):
    write_jsonl(tmp_path / "data.jsonl", ROWS["text"])
    (tmp_path / "f").write_text("x")
    out = {"file": tmp_path / "f", "under-a-file": tmp_path / "f" / "run", "read-only": tmp_path / "ro"}[kind]
    if kind == "read-only":
        out.mkdir(mode=0o500)
        if os.geteuid() == 0:  # root writes anyway: refuse the probe file as a read-only mount would
            def refuse(*args, **kwargs):
                raise OSError(errno.EROFS, "Read-only file system")

            monkeypatch.setattr("lorakit.atomic.tempfile.NamedTemporaryFile", refuse)
    with pytest.raises(lk.LorakitError, match=rf"--out {out} (is a file|is not writable)"):
        run_job(JobConfig.of(model=NOT_A_MODEL, data=str(tmp_path / "data.jsonl"), out=str(out)), progress=False)


def test_a_failed_final_save_keeps_the_adapter_in_a_rescue_folder(tiny_model, tmp_path, monkeypatch):
    write_jsonl(tmp_path / "data.jsonl", ROWS["prompt_completion"])
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    save = job._save_adapter
    kept = {}

    def full_disk(model, tokenizer, folder):
        if str(folder).startswith(str(tmp_path / "run")):
            raise OSError(errno.ENOSPC, "No space left on device")
        kept["adapter"] = lk.adapter_state_dict(model)
        save(model, tokenizer, folder)

    monkeypatch.setattr(job, "_save_adapter", full_disk)
    with pytest.raises(lk.LorakitError, match=r"No space left on device\); the trained adapter was saved to (\S+) "
                                              r"instead") as err:
        run_job(_cfg(tiny_model, tmp_path / "data.jsonl", tmp_path / "run"), progress=False)
    rescue = str(err.value).split("saved to ")[1].split(" instead")[0]
    assert rescue.startswith(str(tmp_path / "tmp"))
    from safetensors.torch import load_file

    saved = load_file(os.path.join(rescue, "adapter_model.safetensors"))
    assert saved.keys() == kept["adapter"].keys()
    assert all(torch.equal(saved[k], kept["adapter"][k]) for k in saved)  # the trained adapter, exactly


# ---- settings: checked and coerced before anything loads ---------------------------------------------------
runner = CliRunner()


def _train(tmp_path, *args: str, config: str | None = None):
    write_jsonl(tmp_path / "data.jsonl", ROWS["text"])
    extra = []
    if config is not None:
        (tmp_path / "run.yaml").write_text(config)
        extra = ["--config", str(tmp_path / "run.yaml")]
    return runner.invoke(app, ["train", "--model", NOT_A_MODEL, "--data", str(tmp_path / "data.jsonl"),
                               "--out", str(tmp_path / "run"), *extra, *args])


@pytest.mark.parametrize("args, config, message", [
    ([], "steps: three\n", r"run.yaml: steps must be an integer, got 'three'"),
    ([], "lr: .nan\n", r"run.yaml: lr must be a finite number, got nan"),
    ([], "dora: maybe\n", r"run.yaml: use_dora must be true or false, got 'maybe'"),
    ([], "config: other.yaml\n", r"cannot name another one"),
    (["--epochs", "0"], None, r"epochs must be a number > 0, got 0"),
    (["--eval-every", "-1"], None, r"eval_every must be an integer >= 0, got -1"),
    (["--nproc", "0"], None, r"nproc must be >= 1, got 0"),
    (["--lr", "nan"], None, r"lr must be a finite number, got nan"),
    ([], "warmup_ratio: 1.5\n", r"warmup_ratio must be a number >= 0 and < 1, got 1.5"),
    (["--task", "classification"], None, r"--task classification needs rows with 'text' and 'label', but the data "
                                         r"is in the text format"),
    (["--resume", "--overwrite"], None, r"choose one"),
])
def test_bad_settings_fail_clearly_before_the_model_loads(args, config, message, tmp_path):
    result = _train(tmp_path, *args, config=config)
    assert isinstance(result.exception, lk.LorakitError), result.output
    assert __import__("re").search(message, str(result.exception)), str(result.exception)


def test_config_files_take_every_flag_name_and_numbers_written_as_strings(tmp_path):
    from lorakit.train.config_file import job_config

    (tmp_path / "run.yaml").write_text("lr: 1e-3\nsteps: '7'\ndora: true\nrslora: true\nbatch-size: 8\nnproc: 1\n"
                                       "gradient_checkpointing: false\ndry_run: false\nmax_grad_norm: 0.5\n")
    cfg = job_config({}, tmp_path / "run.yaml", {})
    assert (cfg.train.lr, cfg.train.steps, cfg.lora.use_dora, cfg.lora.use_rslora, cfg.train.batch_size) == \
        (1e-3, 7, True, True, 8)
    assert cfg.train.max_grad_norm == 0.5 and cfg.nproc == 1


def test_data_errors_name_the_file_and_line_not_a_position_in_the_split(tmp_path):
    rows = ROWS["prompt_completion"][:30]
    rows[16] = {"prompt": "only a prompt"}
    write_jsonl(tmp_path / "data.jsonl", rows)
    result = runner.invoke(app, ["train", "--model", NOT_A_MODEL, "--data", str(tmp_path / "data.jsonl"),
                                 "--out", str(tmp_path / "run")])
    assert "data.jsonl line 17 is missing field 'completion'" in str(result.exception)


def test_eval_data_errors_name_the_eval_file(tmp_path):
    write_jsonl(tmp_path / "data.jsonl", ROWS["prompt_completion"])
    write_jsonl(tmp_path / "held.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": 3}])
    result = runner.invoke(app, ["train", "--model", NOT_A_MODEL, "--data", str(tmp_path / "data.jsonl"),
                                 "--eval-data", str(tmp_path / "held.jsonl"), "--out", str(tmp_path / "run")])
    assert "held.jsonl line 2: 'completion' must be a string" in str(result.exception)
    write_jsonl(tmp_path / "held.jsonl", ROWS["text"])
    result = runner.invoke(app, ["train", "--model", NOT_A_MODEL, "--data", str(tmp_path / "data.jsonl"),
                                 "--eval-data", str(tmp_path / "held.jsonl"), "--out", str(tmp_path / "run2")])
    assert "held.jsonl is in the text format but --data" in str(result.exception)


def test_a_one_row_file_says_the_row_went_to_the_held_out_split(tmp_path):
    write_jsonl(tmp_path / "data.jsonl", ROWS["text"][:1])
    result = runner.invoke(app, ["train", "--model", NOT_A_MODEL, "--data", str(tmp_path / "data.jsonl"),
                                 "--out", str(tmp_path / "run")])
    assert "has one row, and it went to the held-out split" in str(result.exception)


# ---- merge and inspect ---------------------------------------------------------------------------------------
def test_merge_refuses_writing_over_its_inputs_and_unwritable_outs(tmp_path):
    from test_cli_files import _adapter

    _adapter(tmp_path)
    for out in (tmp_path / "base", tmp_path / "base" / "merged", tmp_path / "adapter"):
        result = runner.invoke(app, ["merge", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"),
                                     "--out", str(out)])
        assert isinstance(result.exception, lk.LorakitError) and "which this command reads" in str(result.exception)
    (tmp_path / "file").write_text("x")
    result = runner.invoke(app, ["merge", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"),
                                 "--out", str(tmp_path / "file" / "merged")])
    assert "is not writable" in str(result.exception)
    assert sorted(p.name for p in (tmp_path / "base").iterdir()) == ["config.json", "generation_config.json",
                                                                      "model.safetensors"]


def test_inspect_names_an_invalid_alpha_pattern(tmp_path):
    from test_cli_files import _adapter

    _adapter(tmp_path)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    config["alpha_pattern"] = {"q_proj(": 4}
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    result = runner.invoke(app, ["inspect", str(tmp_path / "adapter")])
    assert isinstance(result.exception, lk.LorakitError)
    assert "'q_proj(' is not a valid regular expression" in str(result.exception)


def test_after_nproc_2_fails_the_clear_error_is_the_last_word(tmp_path):
    write_jsonl(tmp_path / "data.jsonl", ROWS["text"][:1])
    env = os.environ | {"OMP_NUM_THREADS": "1", "MASTER_PORT": "29519"}
    proc = subprocess.run([sys.executable, "-m", "lorakit", "train", "--model", NOT_A_MODEL, "--data",
                           str(tmp_path / "data.jsonl"), "--out", str(tmp_path / "run"), "--nproc", "2"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "ChildFailedError" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert "went to the held-out split" in proc.stderr.strip().splitlines()[-1] or \
        "went to the held-out split" in " ".join(proc.stderr.split()[-40:])
