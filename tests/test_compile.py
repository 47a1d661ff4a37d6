"""torch.compile on injected models: no graph breaks in the adapter path, no recompiles on weight swaps.

The "aot_eager" backend traces forward and backward exactly as inductor would see them, without
needing a C++ compiler on the test machine.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch import nn

import lorakit as lk


def _model(**cfg) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules=["0", "2"], **cfg))
    _randomize(model)
    return model


def _randomize(model: nn.Module, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("cfg", [{}, {"dropout": 0.1}, {"use_dora": True}, {"use_rslora": True}],
                         ids=["plain", "dropout", "dora", "rslora"])
def test_fullgraph_training_matches_eager(cfg):
    eager, compiled_model = _model(**cfg), _model(**cfg)
    compiled = torch.compile(compiled_model, backend="aot_eager", fullgraph=True)  # a graph break raises
    x = torch.randn(5, 16)
    for module in (eager, compiled_model):
        module.train()
    torch.manual_seed(7)
    expected = eager(x)
    torch.manual_seed(7)
    got = compiled(x)
    torch.testing.assert_close(got, expected)
    expected.pow(2).sum().backward()
    got.pow(2).sum().backward()
    for (name, p), q in zip(eager.named_parameters(), compiled_model.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(q.grad, p.grad, msg=name)


def test_swapping_adapter_weights_does_not_recompile():
    model = _model().eval()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.randn(3, 16)
    with torch.no_grad():
        compiled(x)
        with torch._dynamo.config.patch(error_on_recompile=True):
            _randomize(model, seed=2)  # weights copied in place, as load_state_dict does
            torch.testing.assert_close(compiled(x), model(x))
            for layer in (model[0], model[2]):  # new Parameter objects of the same shapes
                for kind in ("lora_A", "lora_B"):
                    getattr(layer, kind)["default"] = nn.Parameter(torch.randn_like(getattr(layer, kind)["default"]))
            # Unit-variance adapters give outputs near 30, and the traced graph need not run the in-place
            # rank-r add (outᵀ += B·hᵀ) as the same BLAS call eager does: float32 round-off, not more.
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-4)


def test_routed_batches_compile_without_graph_breaks():
    model = _model().eval()
    lk.add_adapter(model, "b", lk.LoraConfig(r=2, target_modules=["0", "2"]))
    _randomize(model, seed=3)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.randn(3, 16)
    with torch.no_grad():
        with lk.route(model, ["default", None, "b"], strategy="gather"):
            expected = model(x)
            got = compiled(x)
    torch.testing.assert_close(got, expected)


def test_injected_llama_compiles_as_one_graph():
    from tiny_models import CASES, build, randomize_adapters

    case = next(c for c in CASES if c.name == "llama")
    model, targets = build(case)
    lk.inject(model, lk.LoraConfig(r=4, target_modules=targets))
    randomize_adapters(model)
    model.train()
    ids = case.make_input(2)["input_ids"]
    expected = model(input_ids=ids, labels=ids).loss
    got = torch.compile(model, backend="aot_eager", fullgraph=True)(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(got, expected)
