"""`lorakit quantize` folders: lorakit reads them exactly, transformers + bitsandbytes reads them too."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

import lorakit as lk
from lorakit.cli import app
from lorakit.models import load_base_model
from lorakit.quant import Linear4bit
from tiny_models import _ids


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("quantize")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=96)).eval()
    model.save_pretrained(root / "base")
    result = CliRunner().invoke(app, ["quantize", "--model", str(root / "base"), "--out", str(root / "q"),
                                      "--compute-dtype", "fp32"])
    assert result.exit_code == 0, result.output
    reference = lk.quantize_model(model, "nf4", compute_dtype=torch.float32)
    return root, reference


def test_lorakit_reads_its_quantized_folder_exactly(folders):
    root, reference = folders
    model, _ = load_base_model(root / "q")
    assert isinstance(model.model.layers[0].mlp.down_proj, Linear4bit)
    ids = _ids(2)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    lk.inject(model, lk.LoraConfig(r=2, target_modules="all-linear"))  # QLoRA on the loaded folder
    assert lk.count_parameters(model)[0] > 0


def test_transformers_with_bitsandbytes_reads_it(folders):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    root, reference = folders
    theirs = AutoModelForCausalLM.from_pretrained(root / "q").eval()
    assert type(theirs.model.layers[0].self_attn.q_proj).__module__.startswith("bitsandbytes")
    ids = _ids(2)
    with torch.no_grad():  # bitsandbytes' CPU kernel rounds differently; the weights are the same bytes
        torch.testing.assert_close(theirs(ids).logits.float(), reference(ids).logits, atol=1e-2, rtol=0)
