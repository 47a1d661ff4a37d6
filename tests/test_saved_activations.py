"""Training forwards keep no activation function outputs (train/saved_activations.py): the gradients are the
same bits as the plain step's, the memory kept for backward drops by exactly those outputs, and the trainer's
steps run that way."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit as lk
import lorakit.train.loop as loop
from lorakit.errors import LorakitError
from lorakit.train.batching import collate
from lorakit.train.loop import Trainer, TrainSettings
from lorakit.train.objectives import causal_lm_loss
from lorakit.train.saved_activations import lean_saved_activations
from tiny_models import VOCAB, randomize_adapters

LAYERS, HIDDEN, INTERMEDIATE, TOKENS = 2, 32, 88, 3 * 11


def _llama() -> nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=LAYERS, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
    model = LlamaForCausalLM(config)
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    randomize_adapters(model)
    return model.train()


Step = tuple[torch.Tensor, dict[str, torch.Tensor], int]


def _step(model: nn.Module, run: Callable[[], torch.Tensor], lean: bool) -> Step:
    """(loss, gradients, bytes of the distinct tensors kept for backward) of one forward and backward."""
    model.zero_grad(set_to_none=True)
    kept: dict[int, int] = {}

    def record(tensor: torch.Tensor) -> torch.Tensor:
        kept[tensor.untyped_storage()._cdata] = tensor.untyped_storage().nbytes()
        return tensor

    hooks = lean_saved_activations(observe=record) if lean else \
        torch.autograd.graph.saved_tensors_hooks(record, lambda t: t)
    with hooks:
        loss = run()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, sum(kept.values())


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_llama_gradients_are_the_same_bits_with_each_silu_output_not_kept(autocast):
    model = _llama()
    ids = torch.randint(0, VOCAB, (3, TOKENS // 3), generator=torch.Generator().manual_seed(1))

    def run() -> torch.Tensor:
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            return model(ids, labels=ids).loss

    plain_loss, plain_grads, plain_bytes = _step(model, run, lean=False)
    lean_loss, lean_grads, lean_bytes = _step(model, run, lean=True)
    assert torch.equal(lean_loss, plain_loss)
    assert plain_grads.keys() == lean_grads.keys() and len(plain_grads) == LAYERS * 7 * 2  # A and B of all-linear
    assert all(torch.equal(lean_grads[name], plain_grads[name]) for name in plain_grads)
    itemsize = 2 if autocast else 4  # the MLP's intermediate tensors come out of bf16 matmuls under autocast
    assert plain_bytes - lean_bytes == LAYERS * TOKENS * INTERMEDIATE * itemsize


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)), as Gemma (tanh GELU) or Llama (SiLU, here applied in place) write it."""

    def __init__(self, act) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.gate, self.up, self.down, self.act = nn.Linear(16, 40), nn.Linear(16, 40), nn.Linear(40, 16), act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.gate(x)) * self.up(x))


@pytest.mark.parametrize("act", [lambda t: F.gelu(t, approximate="tanh"), F.gelu,
                                 lambda t: F.silu(t, inplace=True)], ids=["gelu-tanh", "gelu", "silu-in-place"])
def test_gated_mlp_gradients_are_the_same_bits(act):
    mlp = GatedMLP(act)
    x = torch.randn(12, 16, generator=torch.Generator().manual_seed(2), requires_grad=True)
    plain = _step(mlp, lambda: mlp(x).square().sum(), lean=False)
    lean = _step(mlp, lambda: mlp(x).square().sum(), lean=True)
    assert torch.equal(lean[0], plain[0])
    assert all(torch.equal(lean[1][name], plain[1][name]) for name in plain[1])
    assert plain[2] - lean[2] == 12 * 40 * 4  # act's output (in place: autograd keeps a copy of its input)


def test_an_input_changed_in_place_after_the_forward_is_named():
    gate, up = nn.Linear(8, 8), nn.Linear(8, 8)
    x = torch.randn(4, 8)
    with lean_saved_activations():
        g = gate(x)
        y = F.silu(g) * up(x)
    g.add_(1.0)
    with pytest.raises(LorakitError, match="changed in place"):
        y.sum().backward()


def test_trainer_steps_keep_no_silu_output(monkeypatch):
    kept_by = []
    real = loop.lean_saved_activations

    @contextlib.contextmanager
    def spy():
        with real(observe=lambda t: kept_by.append(type(t.grad_fn).__name__)):
            yield

    monkeypatch.setattr(loop, "lean_saved_activations", spy)
    model = _llama()
    rows = [{"input_ids": list(range(1, n)), "labels": list(range(1, n))} for n in (9, 12, 7, 10)]
    settings = TrainSettings(steps=1, batch_size=4, lr=1e-2, precision="fp32", packing=False)
    Trainer(model, rows, lambda batch: collate(batch, 0, "left"), causal_lm_loss, settings, progress=False).run()
    assert kept_by and "SiluBackward0" not in kept_by  # a plain step keeps each layer's SiLU output
