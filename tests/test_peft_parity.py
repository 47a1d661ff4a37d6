"""Against PEFT: the same A and B give the same forward, and the same config trains the same parameters."""

from __future__ import annotations

import copy

import pytest
import torch

import lorakit as lk
from lorakit.layers import LoraLayer
from tiny_models import _bert, _gpt2, _llama, _t5, _ids

peft = pytest.importorskip("peft")

CONFIGS = [
    dict(target_modules=None),
    dict(target_modules="all-linear"),
    dict(target_modules=["c_attn", "c_fc", "q_proj", "down_proj"], bias="lora_only"),
    dict(target_modules=r".*\.(c_proj|o_proj|up_proj)", bias="all"),
    dict(target_modules="all-linear", use_rslora=True, rank_pattern={"c_attn": 2, "q_proj": 2},
         alpha_pattern={r"h\.1\..*": 5, r"layers\.1\..*": 5}),
    dict(target_modules="all-linear", exclude_modules=["c_fc", "gate_proj"]),
    dict(target_modules=None, modules_to_save=["ln_f", "model.norm"]),  # PEFT: plain suffix; lorakit: dotted
]


def _exists(model, wanted: str) -> bool:
    return any(n == wanted or n.endswith("." + wanted) for n, _ in model.named_modules())


def _peft_config(kwargs: dict, model) -> "peft.LoraConfig":
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    targets = kwargs.get("target_modules")
    if isinstance(targets, list):
        targets = [t for t in targets if t in names]
    keep = {k: v for k, v in kwargs.items() if k not in ("target_modules", "modules_to_save")}
    saved = [m for m in kwargs.get("modules_to_save", []) if _exists(model, m)] or None
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, modules_to_save=saved, **keep)


def _lorakit_config(kwargs: dict, model) -> lk.LoraConfig:
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    kwargs = dict(kwargs)
    if isinstance(kwargs.get("target_modules"), list):
        kwargs["target_modules"] = [t for t in kwargs["target_modules"] if t in names]
    if "exclude_modules" in kwargs:
        kwargs["exclude_modules"] = [t for t in kwargs["exclude_modules"] if t in names]
    if "modules_to_save" in kwargs:
        kwargs["modules_to_save"] = [m for m in kwargs["modules_to_save"] if _exists(model, m)]
    return lk.LoraConfig(r=4, alpha=8, **kwargs)


@pytest.mark.parametrize("build", [_gpt2, _llama], ids=["gpt2", "llama"])
@pytest.mark.parametrize("kwargs", CONFIGS, ids=range(len(CONFIGS)))
def test_same_weights_same_forward_same_trainable_count(build, kwargs):
    torch.manual_seed(0)
    base = build().eval()
    ours = lk.inject(copy.deepcopy(base), _lorakit_config(kwargs, base))
    theirs = peft.get_peft_model(copy.deepcopy(base), _peft_config(kwargs, base))
    assert lk.count_parameters(ours) == tuple(theirs.get_nb_trainable_parameters())
    gen = torch.Generator().manual_seed(0)
    adapted = 0
    for name, layer in ours.named_modules():
        if isinstance(layer, LoraLayer):
            other = theirs.base_model.model.get_submodule(name)
            for ours_p, theirs_p in ((layer.lora_A["default"], other.lora_A["default"].weight),
                                     (layer.lora_B["default"], other.lora_B["default"].weight)):
                values = torch.randn(ours_p.shape, generator=gen) * 0.1
                ours_p.data.copy_(values)
                theirs_p.data.copy_(values)
            assert layer.lora_adapters["default"].scaling == pytest.approx(other.scaling["default"])
            adapted += 1
    assert adapted == sum(1 for _, m in theirs.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A)
    ids = _ids(2)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("build", [_gpt2, _llama, _bert, _t5], ids=["gpt2", "llama", "bert", "t5"])
@pytest.mark.parametrize("targets", [None, "all-linear"])
def test_architecture_defaults_match_peft(build, targets):
    torch.manual_seed(0)
    base = build()
    ours = lk.inject(copy.deepcopy(base), lk.LoraConfig(r=4, alpha=8, target_modules=targets))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    assert lk.count_parameters(ours) == tuple(theirs.get_nb_trainable_parameters())
