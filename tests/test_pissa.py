"""PiSSA initialization: PEFT's A, B and residual; files that work on the original base; merge/unload; errors."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit.layers import LoraLayer
from tiny_models import SingleLayer, _gpt2, _ids, _linear4bit, _llama

peft = pytest.importorskip("peft")

ATOL = 1e-5
# (model, lorakit config, the same in PEFT's words): plain, rsLoRA with patterns, DoRA
CASES = {
    "gpt2": (_gpt2, dict(r=4, alpha=8), dict(r=4, lora_alpha=8)),
    "llama": (_llama, dict(r=4, alpha=8), dict(r=4, lora_alpha=8)),
    "llama-rslora-patterns": (
        _llama,
        dict(r=4, alpha=8, use_rslora=True, rank_pattern={"q_proj": 2}, alpha_pattern={r"layers\.1\..*": 5}),
        dict(r=4, lora_alpha=8, use_rslora=True, rank_pattern={"q_proj": 2}, alpha_pattern={r"layers\.1\..*": 5}),
    ),
    "gpt2-dora": (_gpt2, dict(r=4, alpha=8, use_dora=True), dict(r=4, lora_alpha=8, use_dora=True)),
}


def _build(case: str, init: str = "pissa") -> tuple[nn.Module, nn.Module, nn.Module]:
    """A base model, lorakit's PiSSA model of it, and PEFT's."""
    build, ours_kwargs, peft_kwargs = CASES[case]
    torch.manual_seed(0)
    base = build().eval()
    ours = lk.inject(copy.deepcopy(base), lk.LoraConfig(target_modules="all-linear", init=init, **ours_kwargs))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules="all-linear",
                                                                      init_lora_weights=init, **peft_kwargs))
    return base, ours, theirs


def _layers(ours: nn.Module, theirs: nn.Module):
    for name, layer in ours.named_modules():
        if isinstance(layer, LoraLayer):
            yield name, layer, theirs.base_model.model.get_submodule(name)


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _train(model: nn.Module, steps: int = 3) -> None:
    """A few Adam steps, so that A and B move away from the decomposition."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    ids = _ids(4)
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.fixture
def same_random_svd(monkeypatch):
    """torch.svd_lowrank drawing the same random projection for lorakit and PEFT (whose other draws differ)."""
    real = torch.svd_lowrank

    def seeded(*args, **kwargs):
        torch.manual_seed(7)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "svd_lowrank", seeded)
    monkeypatch.setattr(peft.tuners.lora.layer, "svd_lowrank", seeded)


@pytest.mark.parametrize("case", ["gpt2", "llama"])
@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2"])
def test_init_equals_peft_and_keeps_the_base_output(case, init, same_random_svd):
    base, ours, theirs = _build(case, init)
    for name, layer, other in _layers(ours, theirs):
        torch.testing.assert_close(layer.lora_A["default"], other.lora_A["default"].weight, atol=0, rtol=0)
        torch.testing.assert_close(layer.lora_B["default"], other.lora_B["default"].weight, atol=0, rtol=0)
        torch.testing.assert_close(layer.weight, other.base_layer.weight, atol=0, rtol=0)
        assert not torch.equal(layer.weight, base.get_submodule(name).weight)  # the residual, not W
    ids = _ids(3)
    torch.testing.assert_close(_logits(ours, ids), _logits(base, ids), atol=ATOL, rtol=0)
    torch.testing.assert_close(_logits(ours, ids), _logits(theirs, ids), atol=ATOL, rtol=0)


def test_init_with_rslora_patterns_and_dora_equals_peft():
    for case in ("llama-rslora-patterns", "gpt2-dora"):
        base, ours, theirs = _build(case)
        for _, layer, other in _layers(ours, theirs):
            torch.testing.assert_close(layer.lora_B["default"], other.lora_B["default"].weight, atol=0, rtol=0)
            if layer.lora_magnitude:  # PEFT takes ||W_res + s·B·A||, lorakit ||W||: equal up to round-off
                torch.testing.assert_close(layer.lora_magnitude["default"],
                                           other.lora_magnitude_vector["default"].weight, atol=ATOL, rtol=0)
        ids = _ids(3)
        torch.testing.assert_close(_logits(ours, ids), _logits(base, ids), atol=ATOL, rtol=0)
        torch.testing.assert_close(_logits(ours, ids), _logits(theirs, ids), atol=ATOL, rtol=0)


def test_starting_pair_is_no_parameter_and_no_state_dict_entry():
    _, ours, _ = _build("gpt2")
    kaiming = lk.inject(_gpt2(), lk.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    assert lk.count_parameters(ours) == lk.count_parameters(kaiming)
    assert set(ours.state_dict()) == set(kaiming.state_dict())
    copied = copy.deepcopy(ours)
    ids = _ids(2)
    torch.testing.assert_close(_logits(copied, ids), _logits(ours, ids), atol=0, rtol=0)
    assert lk.adapter_state_dict(copied).keys() == lk.adapter_state_dict(ours).keys()


@pytest.mark.parametrize("case", list(CASES))
def test_trained_adapter_saved_converted_reproduces_on_the_original_base(case, tmp_path):
    base, ours, _ = _build(case)
    _train(ours)
    ids = _ids(3)
    expected = _logits(ours, ids)
    lk.save(ours, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True
    assert config["r"] == 8
    with_lorakit = lk.load(copy.deepcopy(base), tmp_path)
    with_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    torch.testing.assert_close(_logits(with_lorakit, ids), expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(_logits(with_peft, ids), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", ["gpt2", "llama-rslora-patterns"])
def test_trained_adapter_saved_raw_is_decomposed_again_on_loading(case, tmp_path):
    base, ours, _ = _build(case)
    _train(ours)
    ids = _ids(3)
    expected = _logits(ours, ids)
    lk.save(ours, tmp_path / "raw", convert_pissa=False)
    config = json.loads((tmp_path / "raw" / "adapter_config.json").read_text())
    assert config["init_lora_weights"] == "pissa" and config["r"] == 4
    with_lorakit = lk.load(copy.deepcopy(base), tmp_path / "raw")
    with_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "raw").eval()
    torch.testing.assert_close(_logits(with_lorakit, ids), expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(_logits(with_peft, ids), expected, atol=ATOL, rtol=0)
    lk.save(with_lorakit, tmp_path / "again")  # loaded raw, it is a PiSSA adapter again and converts
    again = lk.load(copy.deepcopy(base), tmp_path / "again")
    torch.testing.assert_close(_logits(again, ids), expected, atol=ATOL, rtol=0)


def test_converted_file_equals_peft_conversion(tmp_path):
    _, ours, theirs = _build("llama")
    theirs.save_pretrained(tmp_path / "initial")  # PEFT needs its starting adapter on disk to convert
    _train(ours)
    with torch.no_grad():
        for _, layer, other in _layers(ours, theirs):
            other.lora_A["default"].weight.copy_(layer.lora_A["default"])
            other.lora_B["default"].weight.copy_(layer.lora_B["default"])
    theirs.save_pretrained(tmp_path / "peft", path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    lk.save(ours, tmp_path / "ours")
    mine, their_file = lk.adapter_files.read_adapter(tmp_path / "ours"), lk.adapter_files.read_adapter(tmp_path / "peft")
    for key in ("r", "lora_alpha", "init_lora_weights", "rank_pattern", "alpha_pattern"):
        assert mine.config[key] == their_file.config[key], key
    assert mine.pairs.keys() == their_file.pairs.keys()
    for name, pair in mine.pairs.items():
        torch.testing.assert_close(pair["A"], their_file.pairs[name]["A"], atol=0, rtol=0)
        torch.testing.assert_close(pair["B"], their_file.pairs[name]["B"], atol=0, rtol=0)


def test_merge_unmerge_and_unload():
    base, ours, theirs = _build("gpt2")
    _train(ours)
    ids = _ids(3)
    expected = _logits(ours, ids)
    residuals = {n: layer.weight.detach().clone() for n, layer, _ in _layers(ours, theirs)}
    lk.merge(ours)
    torch.testing.assert_close(_logits(ours, ids), expected, atol=ATOL, rtol=0)
    lk.unmerge(ours)
    for name, layer, _ in _layers(ours, theirs):
        torch.testing.assert_close(layer.weight, residuals[name], atol=ATOL, rtol=0)
    merged = lk.unload(copy.deepcopy(ours), merge=True)  # the trained model, as plain weights
    torch.testing.assert_close(_logits(merged, ids), expected, atol=ATOL, rtol=0)
    plain = lk.unload(ours, merge=False)  # documented: the base keeps the residuals
    for name, weight in residuals.items():
        module = plain.get_submodule(name)
        assert type(module) is type(base.get_submodule(name)) and not hasattr(module, "lora_adapters")
        torch.testing.assert_close(module.weight, weight, atol=ATOL, rtol=0)


def test_bf16_base_keeps_its_dtype_and_float32_adapters():
    torch.manual_seed(0)
    base = _llama().to(torch.bfloat16).eval()
    ours = lk.inject(copy.deepcopy(base), lk.LoraConfig(r=4, alpha=8, target_modules="all-linear", init="pissa"))
    layer = ours.model.layers[0].self_attn.q_proj
    assert layer.weight.dtype == torch.bfloat16 and layer.lora_A["default"].dtype == torch.float32
    ids = _ids(2)
    torch.testing.assert_close(_logits(ours, ids).float(), _logits(base, ids).float(), atol=0.05, rtol=0)


# ---- what PiSSA refuses, before the model changes ---------------------------------------------------------
def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def _assert_same(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    assert _weights(model).keys() == weights.keys()
    for name, tensor in _weights(model).items():
        assert torch.equal(tensor, weights[name]), name


@pytest.mark.parametrize("build, targets, message", [
    (_gpt2, ["c_attn", "wte"], "'transformer.wte' is a Embedding.*use init='kaiming'"),
    (lambda: SingleLayer(nn.Conv1d(4, 6, 3)), ["layer"], "linear weights only.*Conv1d"),
    (lambda: SingleLayer(_linear4bit()), ["layer"], "Linear4bit.*cannot rewrite"),
], ids=["embedding", "conv", "4bit"])
def test_unsupported_layers_are_refused(build, targets, message):
    model = build()
    weights = _weights(model)
    with pytest.raises(lk.LorakitError, match=message):
        lk.inject(model, lk.LoraConfig(r=2, target_modules=targets, init="pissa"))
    _assert_same(model, weights)
    assert not hasattr(model, "lorakit_state")


def test_rank_above_the_weight_rank_is_refused():
    model = _llama()
    with pytest.raises(lk.LorakitError, match="has 32, fewer than r=40; lower r for it with rank_pattern"):
        lk.inject(model, lk.LoraConfig(r=40, target_modules=["q_proj"], init="pissa"))
    assert not hasattr(model, "lorakit_state")


def test_pissa_adapter_stays_alone(tmp_path):
    base, ours, _ = _build("llama")
    weights = _weights(ours)
    with pytest.raises(lk.LorakitError, match="started with PiSSA.*fresh copy of the base"):
        lk.add_adapter(ours, "other", lk.LoraConfig(r=2, target_modules=["q_proj"]))
    kaiming = lk.inject(copy.deepcopy(base), lk.LoraConfig(r=2, target_modules=["q_proj"]))
    lk.save(kaiming, tmp_path)
    with pytest.raises(lk.LorakitError, match="started with PiSSA"):
        lk.load(ours, tmp_path, adapter="other")
    _assert_same(ours, weights)
    kaiming_weights = _weights(kaiming)
    with pytest.raises(lk.LorakitError, match=r"rewrites the base weights that the adapters \['default'\]"):
        lk.add_adapter(kaiming, "pissa", lk.LoraConfig(r=2, target_modules=["v_proj"], init="pissa"))
    _assert_same(kaiming, kaiming_weights)


def test_randomized_svd_adapter_cannot_be_saved_raw(tmp_path):
    base, ours, theirs = _build("gpt2", init="pissa_niter_2")
    with pytest.raises(lk.LorakitError, match="randomized SVD.*convert_pissa=True"):
        lk.save(ours, tmp_path / "raw", convert_pissa=False)
    assert not (tmp_path / "raw").exists()
    theirs.save_pretrained(tmp_path / "peft")  # PEFT writes it, relative to a residual it cannot rebuild
    with pytest.raises(lk.FormatError, match="init_lora_weights is 'pissa_niter_2'.*path_initial_model"):
        lk.load(copy.deepcopy(base), tmp_path / "peft")


@pytest.mark.parametrize("init", ["pissa_niter_", "pissa_niter_x", "PiSSA", 1])
def test_init_names_are_checked(init):
    with pytest.raises(lk.LorakitError, match="init must be one of"):
        lk.LoraConfig(init=init)
