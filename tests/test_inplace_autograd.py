"""The in-place custom-autograd adapter path (layers/inplace_autograd.py): exact gradients, the same results as plain autograd,
and less kept for backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakit as lk
from lorakit.layers import inplace_autograd


def _reference(out, x, A, B, scaling, dropout):
    """What autograd does without the in-place path (same random stream for dropout)."""
    dropped = F.dropout(x, dropout, training=True) if dropout else x
    return out + F.linear(F.linear(dropped, A) * scaling, B)


def _inputs(dtype=torch.float64, batch=(2, 3)):
    g = torch.Generator().manual_seed(0)
    make = lambda *s: torch.randn(*s, generator=g, dtype=dtype, requires_grad=True)  # noqa: E731
    return make(*batch, 6), make(*batch, 5), make(4, 5), make(6, 4)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_gradcheck_float64(dropout):
    base, x, A, B = _inputs()

    def fn(base, x, A, B):
        torch.manual_seed(1)  # the same dropout mask on every call gradcheck makes
        return inplace_autograd.LoraAdd.apply(base.clone(), x, A, B, 1.7, dropout)

    assert torch.autograd.gradcheck(fn, (base, x, A, B))


@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_matches_plain_autograd(dropout):
    tensors = _inputs(torch.float32)
    expected_inputs = [t.detach().clone().requires_grad_() for t in tensors]
    torch.manual_seed(3)
    got = inplace_autograd.add_lora_(tensors[0].clone(), *tensors[1:], 2.0, dropout)
    torch.manual_seed(3)
    expected = _reference(*expected_inputs, 2.0, dropout)
    torch.testing.assert_close(got, expected)
    weights = torch.randn_like(got)
    (got * weights).sum().backward()
    (expected * weights).sum().backward()
    for mine, theirs in zip(tensors, expected_inputs):
        torch.testing.assert_close(mine.grad, theirs.grad)


def test_autocast_bf16_computes_like_autocast_linear():
    _, x, A, B = (t.detach().float() for t in _inputs())
    base = torch.randn(2, 3, 6, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = inplace_autograd.add_lora_(base.clone(), x, A, B, 0.5, 0.0)
        expected = base + F.linear(F.linear(x, A) * 0.5, B)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected.to(torch.bfloat16), atol=2e-2, rtol=2e-2)


def test_inference_mode_updates_in_place():
    _, x, A, B = (t.detach() for t in _inputs())
    with torch.inference_mode():
        base = torch.zeros(2, 3, 6, dtype=torch.float64)
        out = inplace_autograd.add_lora_(base, x, A, B, 1.0, 0.0)
    assert out is base
    torch.testing.assert_close(out, F.linear(F.linear(x, A), B))


def _saved_bytes(layer: nn.Module, x: torch.Tensor) -> int:
    """Bytes of distinct storages autograd keeps for backward of one forward (input excluded)."""
    storages: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() != x.untyped_storage().data_ptr():
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    return sum(storages.values())


def test_dropout_keeps_a_mask_not_the_dropped_input():
    torch.manual_seed(0)
    layer = lk.nn.Linear(256, 256, r=4, lora_dropout=0.1, merge_weights=False).train()
    x = torch.randn(64, 256)
    inplace_bytes = _saved_bytes(layer, x)
    layer.lora_inplace = False  # force the generic path
    plain_bytes = _saved_bytes(layer, x)
    dropped_copy = 64 * 256 * 4  # float32 bytes of a dropped copy of x
    assert plain_bytes > dropped_copy > inplace_bytes  # the in-place path keeps a bool mask, A, B and h instead


def test_subclass_with_its_own_forward_is_not_updated_in_place():
    class ReluLinear(nn.Linear):  # relu saves its output for backward
        def forward(self, x):
            return torch.relu(super().forward(x))

    torch.manual_seed(0)
    model = nn.Sequential(ReluLinear(8, 8))
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["0"]))
    nn.init.normal_(model[0].lora_B["default"])
    assert not model[0].lora_inplace
    model(torch.randn(3, 8)).sum().backward()  # no "modified by an inplace operation" error
    assert model[0].lora_A["default"].grad is not None


@pytest.mark.parametrize("with_bias", [False, True])
def test_dora_gradcheck_float64(with_bias):
    base, x, A, B = _inputs()
    g = torch.Generator().manual_seed(5)
    magnitude = (torch.rand(6, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    norm = torch.rand(6, generator=g, dtype=torch.float64) + 0.5
    bias = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True) if with_bias else None

    def fn(base, x, A, B, magnitude, *bias):
        return inplace_autograd.LoraDoraAdd.apply(base.clone(), x, A, B, 0.7, magnitude, norm, *(bias or (None,)))

    assert torch.autograd.gradcheck(fn, (base, x, A, B, magnitude, *([bias] if with_bias else [])))
