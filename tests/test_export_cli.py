"""`lorakit export` and `lorakit merge --format gguf` on tiny models."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from typer.testing import CliRunner

import lorakit as lk
from lorakit.cli import app
from lorakit.errors import LorakitError
from lorakit.export import merged_to_gguf
from test_export_gguf import _tensors, _tokenizer_gguf
from tiny_models import _ids, _llama, randomize_adapters

gguf = pytest.importorskip("gguf")
runner = CliRunner()


def _folders(tmp_path, **cfg):
    torch.manual_seed(0)
    base = _llama().eval()
    base.save_pretrained(tmp_path / "base")
    settings = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]} | cfg
    model = lk.inject(copy.deepcopy(base), lk.LoraConfig(**settings))
    randomize_adapters(model)
    lk.save(model, tmp_path / "adapter")
    return base, model


def test_export_vllm_prints_the_flags(tmp_path):
    _folders(tmp_path, rank_pattern={"v_proj": 20})
    result = runner.invoke(app, ["export", str(tmp_path / "adapter"), "--format", "vllm", "--out", str(tmp_path / "v")])
    assert result.exit_code == 0, result.output
    assert "--max-lora-rank 32" in result.output and "vllm serve BASE" in result.output
    assert json.loads((tmp_path / "v" / "adapter_config.json").read_text())["r"] == 20


def test_export_gguf_from_a_base_folder(tmp_path):
    _folders(tmp_path)
    out = tmp_path / "a.gguf"
    result = runner.invoke(app, ["export", str(tmp_path / "adapter"), "--format", "gguf", "--out", str(out),
                                 "--model", str(tmp_path / "base"), "--dtype", "bf16"])
    assert result.exit_code == 0, result.output
    assert "llama-cli -m BASE.gguf --lora" in result.output
    assert {kind for _, _, kind in _tensors(out).values()} == {"BF16"} and len(_tensors(out)) == 8


def test_export_bad_options(tmp_path):
    _folders(tmp_path)
    bad = runner.invoke(app, ["export", str(tmp_path / "adapter"), "--format", "onnx", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "'onnx' is not one of vllm, gguf" in bad.output
    model = runner.invoke(app, ["export", str(tmp_path / "adapter"), "--format", "vllm", "--out", str(tmp_path / "x"),
                                "--model", "default"])
    assert isinstance(model.exception, LorakitError) and "--model is for --format gguf" in str(model.exception)


def test_merge_to_gguf_from_a_gguf_base(tmp_path):
    from transformers import AutoModelForCausalLM

    base, model = _folders(tmp_path)
    merged_to_gguf(base, tmp_path / "base.gguf", _tokenizer_gguf(tmp_path / "tok.gguf"))
    out = tmp_path / "merged" / "m.gguf"
    result = runner.invoke(app, ["merge", "--model", str(tmp_path / "base.gguf"), "--adapter",
                                 str(tmp_path / "adapter"), "--out", str(out), "--format", "gguf"])
    assert result.exit_code == 0, result.output
    loaded = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32).eval()
    ids = _ids(2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=1e-5, rtol=0)


def test_merge_to_gguf_needs_a_gguf_base(tmp_path):
    _folders(tmp_path)
    result = runner.invoke(app, ["merge", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"),
                                 "--out", str(tmp_path / "m.gguf"), "--format", "gguf"])
    assert isinstance(result.exception, LorakitError) and "convert_hf_to_gguf" in str(result.exception)
    typo = runner.invoke(app, ["merge", "--adapter", str(tmp_path / "adapter"), "--out", "x", "--format", "ggfu"])
    assert typo.exit_code == 2 and "not one of hf, gguf" in typo.output
