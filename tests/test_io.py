"""Adapter folders: lorakit <-> files <-> PEFT, loralib checkpoints, corruption and interrupted saves."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit as lk
from lorakit.layers import LoraLayer
from tiny_models import CASES, _gpt2, _ids, _llama, build, randomize_adapters

peft = pytest.importorskip("peft")
ATOL = 1e-5


def _adapted(build_fn, **cfg):
    torch.manual_seed(0)
    base = build_fn().eval()
    model = lk.inject(copy.deepcopy(base), lk.LoraConfig(r=4, alpha=8, **cfg))
    randomize_adapters(model)
    return base, model


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_round_trip_every_layer_kind(case, tmp_path):
    model, targets = build(case)
    fresh = copy.deepcopy(model)
    lk.inject(model, lk.LoraConfig(r=3, alpha=5, target_modules=targets))
    randomize_adapters(model)
    lk.save(model, tmp_path)
    lk.load(fresh, tmp_path)
    inputs = case.make_input(2)
    with torch.no_grad():
        torch.testing.assert_close(case.output(fresh, inputs), case.output(model, inputs), atol=0, rtol=0)


@pytest.mark.parametrize("build_fn", [_gpt2, _llama], ids=["gpt2", "llama"])
@pytest.mark.parametrize("cfg", [
    dict(target_modules=None),
    dict(target_modules="all-linear", rank_pattern={"c_fc": 2, "up_proj": 2}, alpha_pattern={"c_proj": 3, "o_proj": 3}),
    dict(target_modules="all-linear", use_rslora=True, modules_to_save=["ln_f", "model.norm"]),
], ids=["default", "patterns", "rslora-saved"])
def test_lorakit_folder_loads_in_peft(build_fn, cfg, tmp_path):
    names = {n for n, _ in build_fn().named_modules()}
    cfg["modules_to_save"] = [m for m in cfg.get("modules_to_save", []) if any(n.endswith(m) for n in names)]
    base, model = _adapted(build_fn, **cfg)
    lk.save(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    ids = _ids(2)
    torch.testing.assert_close(_logits(theirs, ids), _logits(model, ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize("build_fn", [_gpt2, _llama], ids=["gpt2", "llama"])
def test_peft_folder_with_two_adapters_loads_in_lorakit(build_fn, tmp_path):
    torch.manual_seed(0)
    base = build_fn().eval()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, rank_pattern={"c_attn": 2, "q_proj": 2},
        alpha_pattern={"c_fc": 5, "v_proj": 5}))
    theirs.add_adapter("second", peft.LoraConfig(r=2, lora_alpha=3, target_modules=None, init_lora_weights=False))
    theirs.save_pretrained(tmp_path)
    assert (tmp_path / "second" / "adapter_config.json").is_file()
    ids = _ids(2)
    for name, folder in (("default", tmp_path), ("second", tmp_path / "second")):
        theirs.set_adapter(name)
        expected = _logits(theirs, ids)
        ours = lk.load(copy.deepcopy(base), folder)
        torch.testing.assert_close(_logits(ours, ids), expected, atol=ATOL, rtol=0)
    ours = lk.load(copy.deepcopy(base), tmp_path)
    lk.load(ours, tmp_path / "second", adapter="second")
    lk.set_active(ours, "second")
    torch.testing.assert_close(_logits(ours, ids), expected, atol=ATOL, rtol=0)


def test_several_adapters_save_as_peft_does(tmp_path):
    base, model = _adapted(_llama)
    lk.add_adapter(model, "sql", lk.LoraConfig(r=2, target_modules=["k_proj"]))
    randomize_adapters(model, "sql", seed=5)
    lk.save(model, tmp_path, adapter=None)
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "sql" / "adapter_model.safetensors").is_file()
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    theirs.load_adapter(tmp_path / "sql", adapter_name="sql")
    theirs.set_adapter("sql")
    lk.set_active(model, "sql")
    ids = _ids(2)
    torch.testing.assert_close(_logits(theirs, ids), _logits(model, ids), atol=ATOL, rtol=0)


def test_file_layout_and_dtype(tmp_path):
    _, model = _adapted(_gpt2, target_modules=["c_attn", "wte"])
    lk.save(model, tmp_path, dtype=torch.bfloat16)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert tensors["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"].shape == (4, 32)
    assert tensors["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"].shape == (96, 4)
    assert tensors["base_model.model.transformer.wte.lora_embedding_A"].shape == (4, 96)
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["target_modules"] == ["c_attn", "wte"] and config["fan_in_fan_out"] is True


def test_partial_targets_are_written_as_full_names(tmp_path):
    _, model = _adapted(_llama, target_modules=r"model\.layers\.0\.self_attn\.q_proj")
    lk.save(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == ["model.layers.0.self_attn.q_proj"]


def test_loralib_gpt2_merged_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = _gpt2().eval()
    d, r = 32, 2
    state = {f"transformer.h.{i}.attn.c_attn.lora_A": torch.randn(2 * r, d) * 0.1 for i in range(2)}
    state |= {f"transformer.h.{i}.attn.c_attn.lora_B": torch.randn(2 * d, r) * 0.1 for i in range(2)}
    torch.save(state, tmp_path / "lora.pt")
    reference = copy.deepcopy(model)
    with torch.no_grad():  # loralib's delta: q gets B[:d] A[:r], v gets B[d:] A[r:], scaled alpha / r
        for i in range(2):
            A, B = state[f"transformer.h.{i}.attn.c_attn.lora_A"], state[f"transformer.h.{i}.attn.c_attn.lora_B"]
            delta = torch.zeros(3 * d, d)
            delta[:d] = B[:d] @ A[:r]
            delta[2 * d:] = B[d:] @ A[r:]
            reference.transformer.h[i].attn.c_attn.weight += (delta * 16 / r).T
    with pytest.raises(lk.FormatError, match="enable_lora"):
        lk.load_loralib(copy.deepcopy(model), tmp_path / "lora.pt", alpha=16)
    lk.load_loralib(model, tmp_path / "lora.pt", alpha=16, enable_lora=[True, False, True])
    ids = _ids(2)
    torch.testing.assert_close(_logits(model, ids), _logits(reference, ids), atol=ATOL, rtol=0)
    lk.save(model, tmp_path / "as_peft")  # fused parts become one exact block-structured pair
    theirs = peft.PeftModel.from_pretrained(_gpt2_like(reference_seed=0), tmp_path / "as_peft")
    torch.testing.assert_close(_logits(theirs, ids), _logits(reference, ids), atol=ATOL, rtol=0)


def _gpt2_like(reference_seed: int):
    torch.manual_seed(reference_seed)
    return _gpt2().eval()


# ---- corruption -------------------------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    base, model = _adapted(_llama)
    lk.save(model, tmp_path)
    return base, tmp_path


def _assert_load_fails(base, folder, match):
    target = copy.deepcopy(base)
    before = {n: (p.clone(), p.requires_grad) for n, p in target.named_parameters()}
    with pytest.raises(lk.FormatError, match=match):
        lk.load(target, folder)
    assert not any(isinstance(m, LoraLayer) for m in target.modules())
    assert not hasattr(target, "lorakit_state")
    for n, p in target.named_parameters():
        assert torch.equal(p, before[n][0]) and p.requires_grad == before[n][1]


def test_truncated_weights(saved):
    base, folder = saved
    path = folder / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    _assert_load_fails(base, folder, "adapter_model.safetensors: not a readable safetensors file")


def test_flipped_header_bytes(saved):
    base, folder = saved
    path = folder / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    data[10:20] = b"\xff" * 10
    path.write_bytes(bytes(data))
    _assert_load_fails(base, folder, "truncated or corrupt")


def test_wrong_shapes_name_key_and_shapes(saved):
    base, folder = saved
    _, other = _adapted(lambda: _llama_wide())
    lk.save(other, folder)
    _assert_load_fails(base, folder, r"q_proj lora_A: file has \(4, 48\), model expects \(4, 32\)")


def _llama_wide():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=48, intermediate_size=64, num_attention_heads=4,
                                        num_key_value_heads=2, vocab_size=96))


def test_missing_tensor(saved):
    base, folder = saved
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    del tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    save_file(tensors, path)
    _assert_load_fails(base, folder, "layers.1.self_attn.v_proj has no lora_B")


def test_extra_key_the_model_lacks(saved):
    base, folder = saved
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors["base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 32)
    tensors["base_model.model.model.layers.7.self_attn.q_proj.lora_B.weight"] = torch.zeros(32, 4)
    save_file(tensors, path)
    _assert_load_fails(base, folder, "has no module 'model.layers.7.self_attn.q_proj'")


def test_unknown_peft_type_and_missing_config(saved):
    base, folder = saved
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(config | {"peft_type": "IA3"}))
    _assert_load_fails(base, folder, "peft_type is 'IA3'")
    (folder / "adapter_config.json").unlink()
    _assert_load_fails(base, folder, "adapter_config.json is missing")


def test_interrupted_save_keeps_previous_folder(saved, monkeypatch):
    base, folder = saved
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    _, other = _adapted(_llama)
    randomize_adapters(other, seed=11)

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        lk.save(other, folder)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    lk.load(copy.deepcopy(base), folder)


def test_loading_an_existing_adapter_name_is_refused(saved):
    base, folder = saved
    model = lk.load(copy.deepcopy(base), folder)
    with pytest.raises(lk.LorakitError, match="already exists"):
        lk.load(model, folder)
