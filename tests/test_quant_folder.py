"""`lorakit quantize` folders: lorakit reads them exactly, transformers + bitsandbytes reads them too."""

from __future__ import annotations

import gc
import os

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import lorakit as lk
from lorakit.cli import app
from lorakit.models import load_base_model
from lorakit.quant import Linear4bit
from tiny_models import VOCAB, _ids


def _llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB))


def _gpt2() -> nn.Module:
    """64 wide: bitsandbytes' CPU inference kernel fails on layers narrower than its block size."""
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=32))


@pytest.fixture(scope="module", params=[_llama, _gpt2], ids=["llama", "gpt2"])  # gpt2: Conv1D layers, tied head
def folders(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("quantize")
    torch.manual_seed(0)
    model = request.param().eval()
    model.save_pretrained(root / "base")
    result = CliRunner().invoke(app, ["quantize", "--model", str(root / "base"), "--out", str(root / "q"),
                                      "--compute-dtype", "fp32"])
    assert result.exit_code == 0, result.output
    reference = lk.quantize_model(model, "nf4", compute_dtype=torch.float32)
    return root, reference


def _quantized_names(model: nn.Module, kind: type) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, kind)]


def test_lorakit_reads_its_quantized_folder_exactly(folders):
    root, reference = folders
    model, _ = load_base_model(root / "q")
    assert _quantized_names(model, Linear4bit) == _quantized_names(reference, Linear4bit)
    ids = _ids(2)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    lk.inject(model, lk.LoraConfig(r=2, target_modules="all-linear"))  # QLoRA on the loaded folder
    assert lk.count_parameters(model)[0] > 0


def test_transformers_with_bitsandbytes_reads_it(folders):
    bnb = pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    root, reference = folders
    theirs = AutoModelForCausalLM.from_pretrained(root / "q").eval()
    assert _quantized_names(theirs, bnb.nn.Linear4bit) == _quantized_names(reference, Linear4bit)
    ids = _ids(2)
    with torch.no_grad():  # bitsandbytes' CPU kernel rounds differently; the weights are the same bytes
        torch.testing.assert_close(theirs(ids).logits.float(), reference(ids).logits, atol=1e-2, rtol=0)


def _mapped(path) -> bool:
    with open("/proc/self/maps") as maps:
        return any(line.rstrip().endswith(str(path)) for line in maps)


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads Linux's list of the process's mappings")
def test_quantizing_a_loaded_folder_lets_go_of_its_file(folders):
    """from_pretrained leaves each weight a view of the mapped safetensors file; after quantize_model
    nothing may keep that mapping (and the pages it read) alive, and the logits are those of the
    model quantized in memory."""
    root, reference = folders
    weights = (root / "base" / "model.safetensors").resolve()
    model, _ = load_base_model(root / "base")
    assert _mapped(weights)
    assert not all(p.untyped_storage().resizable() for p in model.parameters())  # the views this is about
    lk.quantize_model(model, "nf4", compute_dtype=torch.float32)
    gc.collect()
    assert not _mapped(weights)
    assert all(t.untyped_storage().resizable() for t in [*model.parameters(), *model.buffers()])
    ids = _ids(2)
    with torch.no_grad():
        assert torch.equal(model.eval()(ids).logits, reference(ids).logits)
