"""LoRA variants against PEFT: DoRA (forward, gradients, merge, files) and LoRA+ parameter groups."""

from __future__ import annotations

import copy

import pytest
import torch

import lorakit as lk
from lorakit.layers import LoraLayer
from tiny_models import _gpt2, _ids, _llama

peft = pytest.importorskip("peft")


def _pair(build, dropout=0.0):
    """The same base with DoRA from lorakit and from PEFT, given identical random A, B and magnitudes."""
    torch.manual_seed(0)
    base = build().eval()
    ours = lk.inject(copy.deepcopy(base), lk.LoraConfig(r=4, alpha=8, target_modules="all-linear", use_dora=True,
                                                       dropout=dropout))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                                      use_dora=True, lora_dropout=dropout))
    gen = torch.Generator().manual_seed(1)
    for name, layer in ours.named_modules():
        if isinstance(layer, LoraLayer):
            other = theirs.base_model.model.get_submodule(name)
            torch.testing.assert_close(layer.lora_magnitude["default"], other.lora_magnitude_vector["default"].weight)
            pairs = [(layer.lora_A["default"], other.lora_A["default"].weight),
                     (layer.lora_B["default"], other.lora_B["default"].weight),
                     (layer.lora_magnitude["default"], other.lora_magnitude_vector["default"].weight)]
            for i, (mine, peft_param) in enumerate(pairs):
                noise = torch.randn(mine.shape, generator=gen) * 0.1
                values = mine.detach() * (1 + noise) if i == 2 else mine.detach() + noise  # m stays positive
                mine.data.copy_(values)
                peft_param.data.copy_(values)
    return base, ours, theirs


@pytest.mark.parametrize("build", [_gpt2, _llama], ids=["gpt2", "llama"])
def test_dora_forward_and_gradients_equal_peft(build):
    _, ours, theirs = _pair(build)
    ids = _ids(3)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, atol=1e-5, rtol=0)
    ours.eval(), theirs.eval()  # eval: GPT-2's own dropout off, so both see the same computation
    ours(input_ids=ids, labels=ids).loss.backward()
    theirs(input_ids=ids, labels=ids).loss.backward()
    mine = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    for name, param in theirs.named_parameters():
        if param.requires_grad:
            key = (name.removeprefix("base_model.model.").replace(".weight", "")
                   .replace("lora_magnitude_vector.default", "lora_magnitude.default"))
            torch.testing.assert_close(mine[key], param.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("build", [_gpt2, _llama], ids=["gpt2", "llama"])
def test_dora_merge_unmerge_and_files(build, tmp_path):
    base, ours, theirs = _pair(build)
    ids = _ids(2)
    weights = {n: p.detach().clone() for n, p in ours.named_parameters() if "lora_" not in n}
    with torch.no_grad():
        unmerged = ours(ids).logits
        lk.merge(ours)
        torch.testing.assert_close(ours(ids).logits, unmerged, atol=1e-5, rtol=0)
        lk.unmerge(ours)
        for n, p in ours.named_parameters():
            if n in weights:  # DoRA's unmerge divides by the merge scale: round-off of a few ulp
                torch.testing.assert_close(p, weights[n], atol=1e-5, rtol=0)
    lk.save(ours, tmp_path / "ours")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    theirs.save_pretrained(tmp_path / "theirs")
    back = lk.load(copy.deepcopy(base), tmp_path / "theirs")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, unmerged, atol=1e-5, rtol=0)
        torch.testing.assert_close(back(ids).logits, theirs(ids).logits, atol=1e-5, rtol=0)


def test_dora_with_dropout_trains_like_peft():
    _, ours, theirs = _pair(_llama, dropout=0.3)
    ids = _ids(2)
    ours.train(), theirs.train()
    torch.manual_seed(5)
    a = ours(ids).logits
    torch.manual_seed(5)
    b = theirs(ids).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_dora_on_other_kinds_is_refused():
    with pytest.raises(lk.LorakitError, match="DoRA applies to linear layers"):
        lk.inject(_gpt2(), lk.LoraConfig(target_modules=["wte"], use_dora=True))


def test_lora_plus_groups():
    model = lk.inject(_llama(), lk.LoraConfig(r=4, target_modules="all-linear", bias="lora_only"))
    groups = lk.optim.param_groups(model, lr=1e-3, ratio=16)
    assert [g["lr"] for g in groups] == [1e-3, 1.6e-2]
    fast = {id(p) for p in groups[1]["params"]}
    assert fast == {id(p) for n, p in model.named_parameters() if ".lora_B." in n}
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in model.parameters() if p.requires_grad)
