"""QLoRA on whole quantized models: switching train/eval, and merging back into 4 bits."""

from __future__ import annotations

import pytest
import torch

import lorakit as lk
from lorakit.quant import quantize_model
from tiny_models import _gpt2, _ids, _llama, randomize_adapters

# Llama's linear layers have no bias, GPT-2's Conv1D layers do (trained here too).
MODELS = {
    "llama": (_llama, lk.LoraConfig(r=4, alpha=8, dropout=0.1, target_modules="all-linear")),
    "gpt2": (_gpt2, lk.LoraConfig(r=4, alpha=8, dropout=0.1, target_modules=["c_attn", "c_proj", "c_fc"],
                                  bias="lora_only")),
}


def _qlora(name: str) -> torch.nn.Module:
    build, cfg = MODELS[name]
    torch.manual_seed(0)
    model = lk.inject(quantize_model(build(), "nf4", compute_dtype=torch.float32), cfg)
    randomize_adapters(model)  # B != 0: every LoRA parameter gets a gradient
    return model


def _gradients(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same dropout masks every time
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name", MODELS)
def test_eval_no_grad_forward_between_steps_leaves_gradients_identical(name):
    """bitsandbytes 0.50.2 on CPU repacks its weights on the first eval forward and then trains wrongly."""
    model = _qlora(name)
    ids = _ids(3)
    before = _gradients(model, ids)
    assert before and all(g.abs().sum() > 0 for g in before.values())
    if name == "gpt2":
        assert any(n.endswith("c_attn.bias") for n in before)
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    after = _gradients(model, ids)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[n], after[n]) for n in before)
