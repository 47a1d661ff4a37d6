"""QLoRA on whole quantized models: switching train/eval, and merging back into 4 bits."""

from __future__ import annotations

import pytest
import torch

import lorakit as lk
from lorakit.layers import LoraLayer
from lorakit.quant import Linear4bit, merge_into_4bit, quantize_model
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


# ---------------------------------------------------------------- merging back into 4 bits

MERGE_CASES = {
    "llama": (_llama, {"target_modules": "all-linear"}),
    "llama_dora": (_llama, {"target_modules": "all-linear", "use_dora": True}),
    "gpt2": (_gpt2, {"target_modules": ["c_attn", "c_proj", "c_fc", "wpe"]}),  # wpe: a dense layer, merged too
}


def _merge_case(name: str, **quant) -> torch.nn.Module:
    build, targets = MERGE_CASES[name]
    torch.manual_seed(0)
    model = quantize_model(build(), compute_dtype=torch.float32, **quant)
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, **targets))
    randomize_adapters(model, std=0.03)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "lora_magnitude" in param_name:
                param.mul_(1.2)  # DoRA's magnitude away from ||W||, so it matters
    return model.eval()


def _merged_weight(layer) -> torch.Tensor:
    """W + s·B·A, or DoRA's m · (W + s·B·A) / ||W + s·B·A|| per row, written from the definitions."""
    spec = layer.lora_adapters["default"]
    weight = layer.dequantize_weight(torch.float32)
    merged = weight + spec.scaling * layer.lora_B["default"] @ layer.lora_A["default"]
    if spec.use_dora:
        merged = layer.lora_magnitude["default"][:, None] * merged / merged.norm(dim=1, keepdim=True)
    return merged.detach()


@pytest.mark.parametrize("name", MERGE_CASES)
def test_merge_into_4bit_reports_the_error_it_adds(name):
    model = _merge_case(name)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    targets = {n: _merged_weight(m) for n, m in layers.items()}
    bases = {n: m.dequantize_weight(torch.float32) for n, m in layers.items()}
    seen = {}

    def keep(module, args, out):
        seen[next(n for n, m in layers.items() if m is module)] = (args[0], out)

    hooks = [m.register_forward_hook(keep) for m in layers.values()]
    ids = _ids(3)
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
    for hook in hooks:
        hook.remove()

    report = merge_into_4bit(model)

    assert [row.name for row in report.layers] == list(layers)
    for row in report.layers:  # the figures, against a direct computation from the new 4-bit weights
        error = model.get_submodule(row.name).dequantize_weight(torch.float32) - targets[row.name]
        torch.testing.assert_close(row.error_norm, error.norm().item(), rtol=1e-5, atol=0)
        torch.testing.assert_close(row.target_norm, targets[row.name].norm().item(), rtol=1e-5, atol=0)
        torch.testing.assert_close(row.delta_norm, (targets[row.name] - bases[row.name]).norm().item(),
                                   rtol=1e-4, atol=0)
        assert row.relative_error == row.error_norm / row.target_norm
        assert 0.03 < row.relative_error < 0.15  # 4-bit rounding: NF4 is about 0.09 on Gaussian weights
    total = sum(row.error_norm**2 for row in report.layers) ** 0.5
    assert report.error_to_delta == pytest.approx(total / sum(row.delta_norm**2 for row in report.layers) ** 0.5)
    # each layer's output moves by at most |x| * |Q(W + ΔW) - (W + ΔW)| from the unmerged QLoRA output
    with torch.no_grad():
        for row in report.layers:
            x, before = seen[row.name]
            moved = (model.get_submodule(row.name)(x) - before).norm().item()
            assert moved <= x.norm().item() * row.error_norm * (1 + 1e-4) + 1e-5, row.name
        merged = model(input_ids=ids).logits
    assert (merged - unmerged).norm() / unmerged.norm() < 2 * report.relative_error
    text = str(report)
    assert f"all {len(layers)} layers" in text and f"{report.relative_error:.4f}" in text


def test_merge_into_4bit_leaves_a_plain_4bit_model_that_bitsandbytes_loads():
    bnb = pytest.importorskip("bitsandbytes")
    quant = {"quant_type": "fp4", "blocksize": 32, "double_quant": False}  # kept as they were, not reset to defaults
    model = _merge_case("gpt2", **quant)
    merge_into_4bit(model)
    assert not any(isinstance(m, LoraLayer) for m in model.modules()) and not hasattr(model, "lorakit_state")
    assert type(model.transformer.wpe) is torch.nn.Embedding
    layers = {n: m for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    assert len(layers) == 8 and all(type(m) is Linear4bit for m in layers.values())
    assert all((m.quant_type, m.blocksize, m.double_quant) == ("fp4", 32, False) for m in layers.values())
    # a freshly quantized skeleton loads the merged state dict, and every layer loads into bitsandbytes
    skeleton = _merge_case("gpt2", **quant)
    lk.unload(skeleton, merge=False)
    skeleton.load_state_dict(model.state_dict())
    ids = _ids(2)
    with torch.no_grad():
        assert torch.equal(skeleton(input_ids=ids).logits, model(input_ids=ids).logits)
    for layer in layers.values():
        state = layer.state_dict()
        theirs = bnb.nn.Linear4bit(layer.in_features, layer.out_features, compute_dtype=torch.float32,
                                   quant_type="fp4")
        stats = {k.removeprefix("weight."): v for k, v in state.items() if k.startswith("weight.")}
        theirs.weight = bnb.nn.Params4bit.from_prequantized(state["weight"], stats, device="cpu", module=theirs)
        theirs.bias = torch.nn.Parameter(state["bias"].clone())
        x = torch.randn(3, layer.in_features, requires_grad=True)  # bitsandbytes' training path: same matmul
        assert torch.equal(theirs(x), layer(x))


def test_merge_into_4bit_refuses_bad_input_and_changes_nothing():
    model = _merge_case("llama")
    with pytest.raises(lk.LorakitError, match="lk.quant.merge_into_4bit"):
        lk.merge(model)  # the in-place merge names the 4-bit one
    weights = {n: b.clone() for n, b in model.named_buffers()}
    with torch.no_grad():
        up = model.model.layers[1].mlp.up_proj
        up.lora_A["default"].fill_(1e20)
        up.lora_B["default"].fill_(1e20)  # W + ΔW overflows float32
    with pytest.raises(lk.LorakitError, match="model.layers.1.mlp.up_proj gives non-finite"):
        merge_into_4bit(model)
    assert sum(isinstance(m, LoraLayer) for m in model.modules()) == 14  # nothing was changed
    assert all(torch.equal(b, weights[n]) for n, b in model.named_buffers())
    lk.set_active(model, None)
    with pytest.raises(lk.LorakitError, match="no adapter is active"):
        merge_into_4bit(model)
    with pytest.raises(lk.LorakitError, match="no lorakit adapters"):
        merge_into_4bit(_llama())
    dense = lk.inject(_llama(), lk.LoraConfig(r=2, target_modules="all-linear"))
    with pytest.raises(lk.LorakitError, match="no 4-bit layers"):
        merge_into_4bit(dense)


def test_dequantized_unload_merges_dora_exactly():
    torch.manual_seed(0)
    cfg = lk.LoraConfig(r=4, alpha=8, target_modules="all-linear", use_dora=True)
    model = lk.inject(quantize_model(_llama(), "nf4", compute_dtype=torch.float32), cfg)
    randomize_adapters(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_magnitude" in name:
                param.mul_(1.2)  # a magnitude that differs from ||W + ΔW||, so DoRA's rescaling matters
        ids = _ids(2)
        expected = model(input_ids=ids).logits
        merged = lk.unload(model, merge=True, dequantize=True)
        assert not any(isinstance(m, (LoraLayer, Linear4bit)) for m in merged.modules())
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-4, rtol=1e-4)
