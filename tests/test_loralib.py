"""loralib-style building blocks share the core and behave as loralib's do."""

from __future__ import annotations

import torch
from torch import nn

import lorakit as lk


def _randomize(module: nn.Module) -> None:
    torch.manual_seed(3)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.1)


def test_linear_eval_merges_and_train_unmerges():
    layer = lk.nn.Linear(6, 5, r=2, lora_alpha=4)
    assert not layer.weight.requires_grad and layer.lora_A["default"].requires_grad
    _randomize(layer)
    x = torch.randn(3, 6)
    weight = layer.weight.detach().clone()
    train_out = layer(x)
    layer.eval()
    assert layer.lora_merged == ("default",)
    torch.testing.assert_close(layer(x), train_out, atol=1e-6, rtol=0)
    layer.train()
    assert layer.lora_merged == ()
    torch.testing.assert_close(layer.weight, weight, atol=1e-7, rtol=0)


def test_fan_in_fan_out_linear_stores_weight_transposed():
    layer = lk.nn.Linear(6, 5, r=2, fan_in_fan_out=True, merge_weights=False)
    assert layer.weight.shape == (6, 5)
    _randomize(layer)
    x = torch.randn(2, 6)
    expected = x @ layer.weight + layer.bias + (x @ layer.lora_A["default"].T @ layer.lora_B["default"].T) * 0.5
    torch.testing.assert_close(layer(x), expected)


def test_merged_linear_adapts_only_enabled_parts():
    layer = lk.nn.MergedLinear(8, 12, r=2, lora_alpha=2, enable_lora=[True, False, True], merge_weights=False)
    assert layer.lora_A["default"].shape == (4, 8) and layer.lora_B["default"].shape == (8, 2)
    _randomize(layer)
    x = torch.randn(5, 8)
    A, B = layer.lora_A["default"], layer.lora_B["default"]
    base = x @ layer.weight.T + layer.bias
    q = x @ A[:2].T @ B[:4].T
    v = x @ A[2:].T @ B[4:].T
    expected = base + torch.cat([q, torch.zeros(5, 4), v], dim=1)
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=0)
    delta = layer.lora_delta("default")
    assert torch.equal(delta[4:8], torch.zeros(4, 8))
    torch.testing.assert_close(x @ (layer.weight + delta).T + layer.bias, expected, atol=1e-6, rtol=0)


def test_embedding_and_conv_blocks():
    emb = lk.nn.Embedding(10, 4, r=2, lora_alpha=2)
    conv = lk.nn.Conv2d(3, 4, 3, r=2, lora_alpha=2, padding=1)
    for layer, x in ((emb, torch.randint(0, 10, (2, 5))), (conv, torch.randn(2, 3, 6, 6))):
        _randomize(layer)
        out = layer(x)
        layer.eval()
        torch.testing.assert_close(layer(x), out, atol=1e-5, rtol=0)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = lk.nn.MergedLinear(8, 24, r=2, enable_lora=[True, False, True])
        self.emb = lk.nn.Embedding(10, 8, r=2)
        self.head = nn.Linear(8, 3)

    def forward(self, ids):
        return self.head(self.qkv(self.emb(ids))[..., :8])


def test_mark_only_lora_and_state_dict_round_trip():
    net = _Net()
    lk.mark_only_lora_as_trainable(net, bias="lora_only")
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable == {"qkv.bias", "emb.lora_A.default", "emb.lora_B.default", "qkv.lora_A.default",
                         "qkv.lora_B.default"}
    _randomize(net)
    state = lk.lora_state_dict(net)
    assert set(state) == {"qkv.lora_A", "qkv.lora_B", "emb.lora_A", "emb.lora_B"}
    other = _Net()
    other.load_state_dict(net.state_dict(), strict=True)
    fresh = _Net()
    fresh.load_state_dict({k: v for k, v in net.state_dict().items() if "lora_" not in k}, strict=False)
    missing, unexpected = fresh.load_state_dict(state, strict=False)  # loralib's workflow
    assert not unexpected
    ids = torch.randint(0, 10, (2, 4))
    torch.testing.assert_close(fresh(ids), net(ids))


def test_inject_and_blocks_are_the_same_class():
    model = lk.inject(nn.Sequential(nn.Linear(4, 4)), lk.LoraConfig(r=2, target_modules=["0"]))
    assert type(model[0]) is lk.nn.Linear
