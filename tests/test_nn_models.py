"""Models written from scratch with lk.nn layers are lorakit models: merge, save, activate, unload work on them,
checked against loralib's own merge and against the same adapter injected into the plain model."""

from __future__ import annotations

import copy

import loralib
import pytest
import torch
from torch import nn

import lorakit as lk


class _Net(nn.Module):
    def __init__(self, linear=lk.nn.Linear, **lora) -> None:
        super().__init__()
        self.up = linear(8, 16, **lora)
        self.act = nn.ReLU()
        self.down = linear(16, 4, **lora)

    def forward(self, x):
        return self.down(self.act(self.up(x)))


def _trained(**extra) -> _Net:
    torch.manual_seed(0)
    net = _Net(r=2, lora_alpha=4, merge_weights=False, **extra)
    with torch.no_grad():
        for name, param in net.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.3)
    return net


def _plain_copy(net: _Net) -> _Net:
    """The same base weights in plain nn.Linear layers."""
    plain = _Net(linear=nn.Linear)
    plain.load_state_dict({k: v for k, v in net.state_dict().items() if "lora_" not in k})
    return plain


def test_merge_matches_loralib_and_unmerge_restores():
    net, x = _trained(), torch.randn(5, 8)
    reference = _Net(linear=loralib.Linear, r=2, lora_alpha=4, merge_weights=True)
    reference.load_state_dict({k.replace(".default", ""): v for k, v in net.state_dict().items()})
    reference.eval()  # loralib merges on eval
    expected, weight = net(x), net.up.weight.detach().clone()
    lk.merge(net)
    torch.testing.assert_close(net.up.weight, reference.up.weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(net.down.weight, reference.down.weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(net(x), expected, atol=1e-5, rtol=0)
    lk.unmerge(net)
    torch.testing.assert_close(net.up.weight, weight, atol=1e-6, rtol=0)


def test_save_load_round_trip_onto_the_plain_model(tmp_path):
    net, x = _trained(), torch.randn(5, 8)
    lk.save(net, tmp_path)
    loaded = lk.load(_plain_copy(net), tmp_path)
    torch.testing.assert_close(loaded(x), net(x), atol=1e-6, rtol=0)
    assert lk.adapter_state_dict(net).keys() == lk.adapter_state_dict(loaded).keys()


def test_set_active_disabled_and_unload():
    net, x = _trained(), torch.randn(5, 8)
    base = _plain_copy(net)(x)
    adapted = net(x)
    with lk.disabled(net):
        torch.testing.assert_close(net(x), base)
    lk.set_active(net, None)
    torch.testing.assert_close(net(x), base)
    lk.set_active(net, "default")
    plain = lk.unload(net, merge=True)
    assert type(plain.up) is nn.Linear and not hasattr(plain, "lorakit_state")
    torch.testing.assert_close(plain(x), adapted, atol=1e-5, rtol=0)


def test_adopted_settings_and_trainable():
    net = _trained()
    lk.mark_only_lora_as_trainable(net)
    lk.add_adapter(net, "other", lk.LoraConfig(r=3, target_modules=["up"]))
    assert net.lorakit_state.configs["default"].r == 2 and net.lorakit_state.configs["default"].alpha == 4
    assert net.lorakit_state.trainable == ("default",) and net.lorakit_state.active == ("default",)
    with pytest.raises(lk.LorakitError, match="already has lorakit adapters"):
        lk.inject(copy.deepcopy(_trained()), lk.LoraConfig(r=2, target_modules=["up"]))
