"""`lorakit inspect` and `lorakit merge` on real folders."""

from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

import lorakit as lk
from lorakit.cli import app
from tiny_models import _ids, _llama, randomize_adapters

runner = CliRunner()


def _adapter(tmp_path):
    torch.manual_seed(0)
    base = _llama().eval()
    base.save_pretrained(tmp_path / "base")
    model = lk.inject(base, lk.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"],
                                          rank_pattern={"v_proj": 2}))
    randomize_adapters(model)
    lk.save(model, tmp_path / "adapter")
    return model


def test_inspect_json_and_table(tmp_path):
    _adapter(tmp_path)
    result = runner.invoke(app, ["inspect", str(tmp_path / "adapter"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["config"]["peft_type"] == "LORA"
    assert {layer["rank"] for layer in report["layers"]} == {2, 4}
    assert all(layer["delta_norm"] > 0 for layer in report["layers"])
    assert report["parameters"] == 2 * (4 * 64) + 2 * (2 * 32 + 2 * 16)
    table = runner.invoke(app, ["inspect", str(tmp_path / "adapter")])
    assert table.exit_code == 0 and "self_attn" in table.output and "r=2 x2, r=4 x2" in table.output


def test_merge_writes_a_plain_transformers_folder(tmp_path):
    from transformers import AutoModelForCausalLM

    model = _adapter(tmp_path)
    ids = _ids(2)
    with torch.no_grad():
        expected = model(ids).logits
    result = runner.invoke(app, ["merge", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"),
                                 "--out", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, expected, atol=1e-5, rtol=0)
    result = runner.invoke(app, ["merge", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"),
                                 "--out", str(tmp_path / "merged16"), "--dtype", "bf16"])
    assert result.exit_code == 0, result.output
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "merged16").dtype == torch.bfloat16
