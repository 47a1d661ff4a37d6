"""lorakit.nn against loralib 0.1.2: every layer kind with the same arguments holds the same tensors under the
same keys (state_dict both ways with strict=True), gives the same outputs in train and eval (merged) modes,
exposes loralib's attributes, and loralib's helpers behave the same."""

from __future__ import annotations


import pytest
import torch
from torch import nn

import lorakit as lk
import lorakit.nn as lora_lk

loralib = pytest.importorskip("loralib")

# (class name, constructor args, constructor kwargs, input factory)
KINDS = {
    "linear": ("Linear", (6, 5), dict(r=2, lora_alpha=4), lambda: torch.randn(3, 6)),
    "linear-fan-in-fan-out": ("Linear", (6, 5), dict(r=2, lora_alpha=3, fan_in_fan_out=True), lambda: torch.randn(3, 6)),
    "merged-partial": ("MergedLinear", (8, 12), dict(r=2, lora_alpha=2, enable_lora=[True, False, True]),
                       lambda: torch.randn(4, 8)),
    "merged-all": ("MergedLinear", (8, 12), dict(r=2, lora_alpha=5, enable_lora=[True, True, True]),
                   lambda: torch.randn(4, 8)),
    "merged-fan-in-fan-out": ("MergedLinear", (8, 12), dict(r=2, lora_alpha=2, enable_lora=[False, True, True],
                                                            fan_in_fan_out=True), lambda: torch.randn(4, 8)),
    "embedding": ("Embedding", (10, 4), dict(r=2, lora_alpha=2), lambda: torch.randint(0, 10, (2, 5))),
    "conv1d-k1": ("Conv1d", (4, 6, 1), dict(r=2, lora_alpha=2), lambda: torch.randn(2, 4, 9)),
    "conv2d-k3": ("Conv2d", (3, 4, 3), dict(r=2, lora_alpha=3, padding=1), lambda: torch.randn(2, 3, 6, 6)),
    "conv2d-k1": ("Conv2d", (3, 4, 1), dict(r=3, lora_alpha=2), lambda: torch.randn(2, 3, 5, 5)),
    "conv3d-k1": ("Conv3d", (2, 4, 1), dict(r=2, lora_alpha=2), lambda: torch.randn(2, 2, 3, 3, 3)),
}


class Net(nn.Module):
    """A model of one layer of a kind, with a plain head, as a loralib user writes one."""

    def __init__(self, lib, kind: str) -> None:
        super().__init__()
        cls, args, kwargs, _ = KINDS[kind]
        torch.manual_seed(0)
        self.layer = getattr(lib, cls)(*args, **kwargs)
        self.head = nn.Linear(1, 2)

    def forward(self, x):
        y = self.layer(x)
        return self.head(y.reshape(*y.shape, 1))


def _pair(kind: str) -> tuple[nn.Module, nn.Module]:
    theirs = Net(loralib, kind)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for name, p in theirs.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if "lora_" in name else 1.0))
    ours = Net(lora_lk, kind)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs


@pytest.mark.parametrize("kind", list(KINDS))
def test_same_keys_shapes_and_outputs_in_train_and_eval(kind):
    ours, theirs = _pair(kind)
    ours_sd, theirs_sd = ours.state_dict(), theirs.state_dict()
    assert {k: v.shape for k, v in ours_sd.items()} == {k: v.shape for k, v in theirs_sd.items()}
    x = KINDS[kind][3]()
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
    ours.eval(), theirs.eval()
    assert ours.layer.merged and theirs.layer.merged
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.state_dict()["layer.conv.weight" if "conv" in kind else "layer.weight"],
                               theirs.state_dict()["layer.conv.weight" if "conv" in kind else "layer.weight"],
                               atol=1e-5, rtol=1e-5)
    ours.train(), theirs.train()
    back = Net(loralib, kind)
    back.load_state_dict(ours.state_dict(), strict=True)  # and lorakit's state_dict into loralib's model
    torch.testing.assert_close(back(x), theirs(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", list(KINDS))
def test_loralib_attributes(kind):
    ours, theirs = _pair(kind)
    for attr in ("r", "lora_alpha", "scaling", "merged", "merge_weights"):
        assert getattr(ours.layer, attr) == getattr(theirs.layer, attr), attr
    if KINDS[kind][0] == "MergedLinear":
        assert ours.layer.enable_lora == theirs.layer.enable_lora
    x = torch.randn(3, 3)
    assert torch.equal(ours.layer.lora_dropout(x), theirs.layer.lora_dropout(x))  # identity at dropout 0


def _requires_grad(model: nn.Module) -> dict[str, bool]:
    """requires_grad under loralib's key names (state_dict(keep_vars=True) holds the parameters)."""
    return {k: v.requires_grad for k, v in model.state_dict(keep_vars=True).items() if isinstance(v, nn.Parameter)}


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
@pytest.mark.parametrize("kind", ["linear", "merged-partial", "embedding", "conv2d-k3"])
def test_mark_only_lora_as_trainable_and_lora_state_dict_match_loralib(kind, bias):
    ours, theirs = _pair(kind)
    for model in (ours, theirs):
        model.head.bias.requires_grad = False
        next(p for n, p in model.named_parameters() if "lora_B" in n).requires_grad = False  # the user froze it
    lora_lk.mark_only_lora_as_trainable(ours, bias=bias)
    loralib.mark_only_lora_as_trainable(theirs, bias=bias)
    assert _requires_grad(ours) == _requires_grad(theirs)
    assert set(lora_lk.lora_state_dict(ours, bias=bias)) == set(loralib.lora_state_dict(theirs, bias=bias))


def test_lk_nn_conv_with_larger_kernels_in_1d_and_3d():
    """loralib cannot run these (its B·A does not reshape to the weight); lorakit's generalization merges exactly."""
    for layer, x in ((lora_lk.Conv1d(4, 6, 3, r=2, lora_alpha=2), torch.randn(2, 4, 9)),
                     (lora_lk.Conv3d(2, 4, 3, r=2, lora_alpha=2), torch.randn(2, 2, 4, 4, 4))):
        with torch.no_grad():
            layer.lora_B["default"].normal_()
        out = layer(x)
        layer.eval()
        torch.testing.assert_close(layer(x), out, atol=1e-5, rtol=1e-5)


def test_inject_keeps_peft_keys_and_unload_restores_plain_keys():
    model = lk.inject(nn.Sequential(nn.Linear(4, 4), nn.Conv2d(2, 3, 3)), lk.LoraConfig(r=2, target_modules=["0", "1"]))
    assert "0.lora_A.default" in model.state_dict() and "1.lora_A.default" in model.state_dict()
    net = Net(lora_lk, "conv2d-k3")
    assert "layer.conv.weight" in net.state_dict()
    layer = net.layer
    layer.lora_teardown()
    assert set(layer.state_dict()) == {"weight", "bias"} and type(layer) is nn.Conv2d


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=50, n_positions=16)).eval()


def test_load_loralib_merged_linear_all_parts_from_microsoft_checkpoint(tmp_path):
    """microsoft/LoRA's GPT-2 stores c_attn as MergedLinear; its script saves {"model_state_dict": ...}."""
    model = _gpt2()
    c_attn = model.transformer.h[0].attn.c_attn
    theirs = loralib.MergedLinear(32, 96, r=2, lora_alpha=4, enable_lora=[True, True, True], fan_in_fan_out=True)
    with torch.no_grad():
        theirs.weight.copy_(c_attn.weight)
        theirs.bias.copy_(c_attn.bias)
        theirs.lora_A.normal_()
        theirs.lora_B.normal_()
    state = {"transformer.h.0.attn.c_attn.lora_A": theirs.lora_A.detach(),
             "transformer.h.0.attn.c_attn.lora_B": theirs.lora_B.detach()}
    torch.save({"model_state_dict": state}, tmp_path / "model.pt")
    lk.load_loralib(model, tmp_path / "model.pt", alpha=4)
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.transformer.h[0].attn.c_attn(x), theirs(x), atol=1e-5, rtol=1e-5)


def test_import_lorakit_nn_as_lora_runs_loralib_code():
    lora = lora_lk
    model = nn.Sequential(lora.Linear(4, 4, r=2), nn.ReLU(), lora.Linear(4, 2, r=2))
    lora.mark_only_lora_as_trainable(model)
    torch.save(lora.lora_state_dict(model), "/dev/null")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "0.lora_A.default", "0.lora_B.default", "2.lora_A.default", "2.lora_B.default"}


def test_loralib_attributes_leave_a_subclass_own_attributes_alone():
    class Scaled(nn.Linear):
        scaling = 3.0

        def forward(self, x):
            return super().forward(x) * self.scaling

    model = lk.inject(nn.Sequential(Scaled(4, 4)), lk.LoraConfig(r=2, target_modules=["0"]))
    assert model[0].scaling == 3.0 and model[0].r == 2
