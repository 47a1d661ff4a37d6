"""The fused LoRA step (layers/fused_linear.py): exact in float64, the same outputs and gradients (input, A, B)
as the unfused path and as PEFT on GPT-2 (Conv1D) and Llama-shaped models, and taken only where it computes
what the unfused path computes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit.layers import LoraLayer, fused_linear
from lorakit.layers.plain_lora import PlainLora
from tiny_models import _gpt2, _ids, _llama, randomize_adapters

peft = pytest.importorskip("peft")


@pytest.mark.parametrize("transposed", [False, True], ids=["out_in", "in_out"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
def test_gradcheck_float64(transposed, with_bias):
    gen = torch.Generator().manual_seed(0)
    make = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)  # noqa: E731
    x, A, B = make(2, 3, 5), make(4, 5), make(6, 4)
    weight = make(5, 6) if transposed else make(6, 5)
    extra = (make(6),) if with_bias else ()

    def fn(x, weight, A, B, *bias):
        return fused_linear.LoraLinear.apply(x, weight, bias[0] if bias else None, A, B, 1.7, transposed,
                                             torch.float64)

    assert torch.autograd.gradcheck(fn, (x, weight, A, B, *extra))


def _spy(monkeypatch) -> list[int]:
    """Counts the layer calls that take the fused step."""
    calls: list[int] = []
    original = fused_linear.lora_linear
    monkeypatch.setattr(fused_linear, "lora_linear", lambda *args: calls.append(1) or original(*args))
    return calls


def _without_dropout(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


def _lorakit(base: nn.Module, fused: bool, monkeypatch, **settings) -> nn.Module:
    """`base` adapted on every linear layer, with the fused step allowed or not; B and A random (seed 1)."""
    model = copy.deepcopy(base)
    with monkeypatch.context() as patch:
        if not fused:
            patch.setattr(PlainLora, "can_fuse", lambda self, spec: False)
        lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules="all-linear", **settings))
    randomize_adapters(model)
    return model


def _peft_twin(base: nn.Module, ours: nn.Module, **settings) -> nn.Module:
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                                       **settings))
    for name, layer in ours.named_modules():
        if isinstance(layer, LoraLayer):
            other = theirs.base_model.model.get_submodule(name)
            with torch.no_grad():
                other.lora_A["default"].weight.copy_(layer.lora_A["default"])
                other.lora_B["default"].weight.copy_(layer.lora_B["default"])
    return theirs


def _step(model: nn.Module, ids: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and the gradient at the input embeddings of sum(logits * weights)."""
    embed = model.get_input_embeddings()
    inputs = embed(ids).detach().requires_grad_()
    logits = model(inputs_embeds=inputs).logits
    (logits * weights).sum().backward()
    return logits.detach(), inputs.grad


def _adapter_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    grads = {}
    for name, param in model.named_parameters():
        if param.requires_grad and param.grad is not None:
            key = name.removeprefix("base_model.model.").replace(".base_layer", "").replace(".default.weight", ".default")
            grads[key] = param.grad
    return grads


@pytest.mark.parametrize("build", [_gpt2, _llama], ids=["gpt2_conv1d", "llama"])
@pytest.mark.parametrize("settings, checkpointing", [({}, False), ({"use_rslora": True}, False),
                                                     ({"bias": "all"}, False), ({}, True)],
                         ids=["plain", "rslora", "bias", "checkpointing"])
def test_same_outputs_and_gradients_as_unfused_and_peft(build, settings, checkpointing, monkeypatch):
    torch.manual_seed(0)
    base = _without_dropout(build()).train()
    if checkpointing:
        base.gradient_checkpointing_enable()
    unfused = _lorakit(base, False, monkeypatch, **settings)
    fused = _lorakit(base, True, monkeypatch, **settings)
    theirs = _peft_twin(base, fused, **settings)
    ids, gen = _ids(2), torch.Generator().manual_seed(3)
    weights = torch.randn(2, ids.shape[1], base.config.vocab_size, generator=gen)
    calls = _spy(monkeypatch)
    expected = _step(unfused, ids, weights)
    assert not calls  # the unfused model never takes the fused step
    got = _step(fused, ids, weights)
    layers = sum(isinstance(m, LoraLayer) for m in fused.modules())
    assert len(calls) == layers * (2 if checkpointing else 1)  # checkpointing runs each forward again
    peft_result = _step(theirs, ids, weights)
    for reference in (expected, peft_result):
        torch.testing.assert_close(got[0], reference[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[1], reference[1], atol=1e-5, rtol=1e-4)
    ours_grads, unfused_grads, peft_grads = (_adapter_grads(m) for m in (fused, unfused, theirs))
    assert ours_grads.keys() == unfused_grads.keys() and len(ours_grads) >= 2 * layers
    for name, grad in ours_grads.items():
        torch.testing.assert_close(grad, unfused_grads[name], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(grad, peft_grads[name], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_lk_nn_linear_float64_matches_unfused(fan_in_fan_out, monkeypatch):
    """loralib-style layers (also stored (in, out)) take the fused step with bit-for-bit float64 agreement
    in the forward and round-off agreement in every gradient, weight and bias included when trainable."""
    results = []
    for fused in (False, True):
        torch.manual_seed(0)
        with monkeypatch.context() as patch:
            if not fused:
                patch.setattr(PlainLora, "can_fuse", lambda self, spec: False)
            layer = lk.nn.Linear(6, 5, r=3, lora_alpha=6, fan_in_fan_out=fan_in_fan_out, merge_weights=False).double()
        layer.weight.requires_grad_(True)
        with torch.no_grad():
            layer.lora_B["default"].normal_()
        x = torch.randn(2, 4, 6, dtype=torch.float64, requires_grad=True)
        calls = _spy(monkeypatch)
        out = layer(x)
        assert len(calls) == fused
        out.pow(2).sum().backward()
        results.append([out, x.grad] + [p.grad for p in layer.parameters()])
    for got, expected in zip(*results[::-1]):
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)


def test_taken_only_where_it_computes_the_same(monkeypatch):
    torch.manual_seed(0)
    model = lk.inject(_llama(), lk.LoraConfig(r=4, alpha=8, dropout=0.5, target_modules=["q_proj"]))
    ids = _ids(2)
    calls = _spy(monkeypatch)
    model.train()(ids)
    assert not calls  # dropout in training: the unfused path draws the mask
    model.eval()(ids)
    assert len(calls) == 2  # dropout is off in eval: both q_proj layers fuse
    lk.add_adapter(model, "other", lk.LoraConfig(r=2, alpha=2, target_modules=["q_proj"]))
    lk.set_active(model, ["default", "other"])
    calls.clear()
    model(ids)
    assert not calls  # two live adapters: the unfused path sums them
    lk.set_active(model, "other")
    with lk.route(model, ["other", None]):
        model(ids)
    assert not calls  # routed rows
    model(ids)
    assert len(calls) == 2
    with torch.no_grad():
        model.to(torch.bfloat16)
        for layer in (m for m in model.modules() if isinstance(m, LoraLayer)):
            for params in (layer.lora_A, layer.lora_B):
                for p in params.values():
                    p.data = p.data.float()  # lorakit's own choice for a bfloat16 base: float32 adapters
        calls.clear()
        model(ids)
    assert not calls  # bfloat16 base with float32 adapters outside autocast: the unfused path's mixed dtypes


def _relative_error(got: torch.Tensor, reference: torch.Tensor) -> float:
    return ((got.float() - reference).norm() / reference.norm()).item()


def test_autocast_bfloat16_as_close_to_float32_as_unfused(monkeypatch):
    """Under bfloat16 autocast both paths round differently; each is measured against the float32 result."""
    torch.manual_seed(0)
    base = _without_dropout(_llama()).train()
    unfused, fused = _lorakit(base, False, monkeypatch), _lorakit(base, True, monkeypatch)
    ids = _ids(2)
    weights = torch.randn(2, ids.shape[1], base.config.vocab_size)
    exact_model = copy.deepcopy(unfused)
    reference = _step(exact_model, ids, weights)
    reference_grads = _adapter_grads(exact_model)
    calls = _spy(monkeypatch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = _step(unfused, ids, weights)
        assert not calls
        got = _step(fused, ids, weights)
    assert calls and got[0].dtype == expected[0].dtype == torch.bfloat16
    pairs = [(got[0], expected[0], reference[0]), (got[1], expected[1], reference[1])]
    expected_grads = _adapter_grads(unfused)
    pairs += [(grad, expected_grads[name], reference_grads[name]) for name, grad in _adapter_grads(fused).items()]
    for fused_result, unfused_result, exact in pairs:
        assert _relative_error(fused_result, exact) < 2 * _relative_error(unfused_result, exact) + 1e-3


def test_inference_mode_builds_no_graph_and_merges_alike(monkeypatch):
    torch.manual_seed(0)
    model = lk.inject(_gpt2().eval(), lk.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    randomize_adapters(model)
    ids = _ids(2)
    calls = _spy(monkeypatch)
    with torch.inference_mode():
        unmerged = model(ids).logits
        lk.merge(model)
        merged = model(ids).logits
        lk.unmerge(model)
        again = model(ids).logits
    layers = sum(isinstance(m, LoraLayer) for m in model.modules())
    assert len(calls) == 2 * layers  # merged adapters are not live: the plain base forward runs
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again, unmerged, atol=1e-5, rtol=1e-5)
