"""Bad input gets a clear lorakit error and leaves the model as it was."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lorakit as lk
from tiny_models import _gpt2, _llama


def _snapshot(model: nn.Module) -> tuple:
    return (
        [(n, type(m)) for n, m in model.named_modules()],
        {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()},
    )


def _assert_unchanged(model: nn.Module, snapshot: tuple) -> None:
    modules, params = snapshot
    assert [(n, type(m)) for n, m in model.named_modules()] == modules
    for n, p in model.named_parameters():
        value, grad = params[n]
        assert torch.equal(p, value) and p.requires_grad == grad, n
    assert not hasattr(model, "lorakit_state") or model.lorakit_state is not None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(r=0), "r must be an integer >= 1"),
        (dict(r=2.5), "r must be an integer"),
        (dict(alpha=0), "alpha must be"),
        (dict(dropout=1.0), "dropout must be"),
        (dict(bias="some"), "bias must be one of"),
        (dict(init="xavier"), "init must be one of"),
        (dict(target_modules="q_proj("), "not a valid regular expression"),
        (dict(target_modules=[1, 2]), "target_modules must be"),
        (dict(target_modules=[]), "target_modules is empty"),
        (dict(rank_pattern={"q": 0}), r"rank_pattern\['q'\]"),
        (dict(alpha_pattern={"[": 2}), "not a valid regular expression"),
        (dict(use_rslora="yes"), "use_rslora must be True or False"),
        (dict(modules_to_save="lm_head"), "modules_to_save must be a list"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(lk.LorakitError, match=message):
        lk.LoraConfig(**kwargs)


def test_unknown_target_lists_candidates_and_leaves_model_unchanged():
    model = _llama()
    snap = _snapshot(model)
    with pytest.raises(lk.LorakitError, match=r"no module matched.*q_proj \(model\.layers\.0\.self_attn\.q_proj\)"):
        lk.inject(model, lk.LoraConfig(target_modules=["query"]))
    _assert_unchanged(model, snap)
    assert not hasattr(model, "lorakit_state")


def test_unadaptable_target_names_the_kind():
    model = _llama()
    snap = _snapshot(model)
    with pytest.raises(lk.LorakitError, match="LlamaRMSNorm, which lorakit cannot adapt"):
        lk.inject(model, lk.LoraConfig(target_modules=["q_proj", "input_layernorm"]))
    _assert_unchanged(model, snap)


def test_grouped_conv_is_refused():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    snap = _snapshot(model)
    with pytest.raises(lk.LorakitError, match="groups=2"):
        lk.inject(model, lk.LoraConfig(target_modules=["0"]))
    _assert_unchanged(model, snap)


def test_multihead_attention_out_proj_is_refused():
    model = nn.Sequential(nn.MultiheadAttention(8, 2))
    with pytest.raises(lk.LorakitError, match="cannot adapt"):
        lk.inject(model, lk.LoraConfig(target_modules=["out_proj"]))


def test_wrong_types():
    with pytest.raises(lk.LorakitError, match="torch.nn.Module"):
        lk.inject("model", lk.LoraConfig())
    with pytest.raises(lk.LorakitError, match="lorakit.LoraConfig"):
        lk.inject(_llama(), {"r": 8})
    with pytest.raises(lk.LorakitError, match="adapter name"):
        lk.inject(_llama(), lk.LoraConfig(), adapter="a.b")


def test_no_architecture_default_for_plain_modules():
    with pytest.raises(lk.LorakitError, match="no default target_modules.*adaptable here: 0"):
        lk.inject(nn.Sequential(nn.Linear(2, 2)), lk.LoraConfig())


def test_injecting_twice_and_adding_an_existing_name():
    model = lk.inject(_gpt2(), lk.LoraConfig())
    snap = _snapshot(model)
    with pytest.raises(lk.LorakitError, match="already has lorakit adapters.*add_adapter"):
        lk.inject(model, lk.LoraConfig())
    with pytest.raises(lk.LorakitError, match="already exists"):
        lk.add_adapter(model, "default", lk.LoraConfig())
    _assert_unchanged(model, snap)


def test_adapter_management_errors():
    model = lk.inject(_gpt2(), lk.LoraConfig())
    lk.add_adapter(model, "other", lk.LoraConfig())
    with pytest.raises(lk.LorakitError, match="is active"):
        lk.delete_adapter(model, "default")
    with pytest.raises(lk.LorakitError, match="no adapter named 'nope'"):
        lk.set_active(model, "nope")
    with pytest.raises(lk.LorakitError, match="no adapter named"):
        lk.set_trainable(model, ["default", "nope"])
    lk.merge(model)
    snap = _snapshot(model)
    with pytest.raises(lk.LorakitError, match="already merged"):
        lk.merge(model)
    with pytest.raises(lk.LorakitError, match="unmerge"):
        lk.set_active(model, "other")
    with pytest.raises(lk.LorakitError, match="unmerge"):
        lk.add_adapter(model, "third", lk.LoraConfig())
    _assert_unchanged(model, snap)
    lk.unmerge(model)
    with pytest.raises(lk.LorakitError, match="nothing is merged"):
        lk.unmerge(model)
    lk.set_active(model, None)
    with pytest.raises(lk.LorakitError, match="no adapter is active"):
        lk.merge(model)


def test_functions_on_a_model_without_adapters():
    with pytest.raises(lk.LorakitError, match="lk.inject"):
        lk.merge(_llama())
    with pytest.raises(lk.LorakitError, match="lk.inject"):
        lk.set_active(_llama(), "default")


def test_route_needs_one_name_per_row():
    model = lk.inject(_gpt2(), lk.LoraConfig())
    with pytest.raises(lk.LorakitError, match="3 rows but"):
        with lk.route(model, ["default", None, "default"]):
            model(torch.randint(0, 50, (2, 5)))
    with pytest.raises(lk.LorakitError, match="one adapter name"):
        with lk.route(model, "default"):
            pass


def test_non_finite_merge_is_refused():
    model = lk.inject(nn.Sequential(nn.Linear(4, 4).half()), lk.LoraConfig(r=2, alpha=2, target_modules=["0"]))
    with torch.no_grad():
        model[0].lora_A["default"].fill_(300.0)
        model[0].lora_B["default"].fill_(300.0)
    weight = copy.deepcopy(model[0].weight.detach())
    with pytest.raises(lk.LorakitError, match="non-finite"):
        lk.merge(model)
    assert torch.equal(model[0].weight, weight)
