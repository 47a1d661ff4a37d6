"""Every refusal (inject, add_adapter, load, load_loralib) leaves the model exactly as it was: module classes,
state_dict keys and values, requires_grad, and lorakit's attached state; also when a step fails half-way."""

from __future__ import annotations

import json

import pytest
import torch

import lorakit as lk
from lorakit.layers.linear import Linear
from lorakit.state import STATE_ATTRIBUTE
from tiny_models import _gpt2, _llama, randomize_adapters


def fingerprint(model: torch.nn.Module) -> tuple:
    state = getattr(model, STATE_ATTRIBUTE, None)
    return (
        [(name, type(module)) for name, module in model.named_modules()],
        {k: v.clone() for k, v in model.state_dict().items()},
        [(name, p.requires_grad) for name, p in model.named_parameters()],
        None if state is None else (sorted(state.configs), state.active, state.trainable),
    )


def assert_same(before: tuple, after: tuple) -> None:
    assert before[0] == after[0]
    assert list(before[1]) == list(after[1])
    for key in before[1]:
        assert torch.equal(before[1][key], after[1][key]), key
    assert before[2:] == after[2:]


def _fresh():
    torch.manual_seed(0)
    return _llama()


def _injected():
    model = lk.inject(_fresh(), lk.LoraConfig(r=2, target_modules=["q_proj"]))
    randomize_adapters(model)
    return model


def _folder(tmp_path, edit=None):
    """A valid lorakit folder of a llama adapter, optionally with its config edited."""
    model = _injected()
    lk.save(model, tmp_path / "ok")
    if edit:
        path = tmp_path / "ok" / "adapter_config.json"
        config = json.loads(path.read_text())
        edit(config)
        path.write_text(json.dumps(config))
    return tmp_path / "ok"


REFUSALS = {
    "inject-dora-on-embedding": (_fresh, lambda m, p: lk.inject(m, lk.LoraConfig(
        target_modules=["embed_tokens", "q_proj"], use_dora=True))),
    "inject-no-match": (_fresh, lambda m, p: lk.inject(m, lk.LoraConfig(target_modules=["nope"]))),
    "inject-bad-saved": (_fresh, lambda m, p: lk.inject(m, lk.LoraConfig(target_modules=["q_proj"],
                                                                          modules_to_save=["nope"]))),
    "inject-twice": (_injected, lambda m, p: lk.inject(m, lk.LoraConfig(target_modules=["v_proj"]))),
    "add-existing-name": (_injected, lambda m, p: lk.add_adapter(m, "default", lk.LoraConfig(target_modules=["v_proj"]))),
    "add-dora-on-embedding": (_injected, lambda m, p: lk.add_adapter(m, "b", lk.LoraConfig(
        target_modules=["embed_tokens", "v_proj"], use_dora=True))),
    "load-unknown-key": (_fresh, lambda m, p: lk.load(m, _folder(p, lambda c: c.update(new_option=1)))),
    "load-alora": (_fresh, lambda m, p: lk.load(m, _folder(p, lambda c: c.update(alora_invocation_tokens=[5])))),
    "load-other-base": (lambda: _gpt2(), lambda m, p: lk.load(m, _folder(p))),
    "load-existing-name": (_injected, lambda m, p: lk.load(m, _folder(p))),
    "load-dora-embedding-file": (_fresh, lambda m, p: lk.load(m, _dora_embedding_folder(p))),
    "loralib-bad-shape": (_fresh, lambda m, p: lk.load_loralib(m, {
        "model.layers.0.self_attn.q_proj.lora_A": torch.zeros(2, 7),
        "model.layers.0.self_attn.q_proj.lora_B": torch.zeros(32, 2)}, alpha=4)),
}


def _dora_embedding_folder(tmp_path):
    """A DoRA folder whose q_proj is fine but whose embed_tokens pair would need DoRA on an embedding."""
    model = lk.inject(_fresh(), lk.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    lk.save(model, tmp_path / "dora")
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "dora" / "adapter_model.safetensors")
    tensors["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.zeros(2, 96)
    tensors["base_model.model.model.embed_tokens.lora_embedding_B"] = torch.zeros(32, 2)
    save_file(tensors, tmp_path / "dora" / "adapter_model.safetensors")
    return tmp_path / "dora"


@pytest.mark.parametrize("name", list(REFUSALS))
def test_refusal_leaves_model_untouched(name, tmp_path):
    build, call = REFUSALS[name]
    model = build()
    before = fingerprint(model)
    with pytest.raises(lk.LorakitError):
        call(model, tmp_path)
    assert_same(before, fingerprint(model))


class _Boom(RuntimeError):
    pass


@pytest.mark.parametrize("how", ["inject", "add_adapter", "load", "inject-pissa"])
def test_failure_half_way_is_rolled_back(how, tmp_path, monkeypatch):
    """A failure after some layers were already swapped (simulated on the second layer) undoes them all."""
    folder = _folder(tmp_path)
    model = _injected() if how == "add_adapter" else _fresh()
    before = fingerprint(model)
    original, calls = Linear.lora_add, []

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise _Boom("simulated")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Linear, "lora_add", failing)
    cfg = lk.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"],
                        init="pissa" if how == "inject-pissa" else "kaiming")
    with pytest.raises(_Boom):
        if how in ("inject", "inject-pissa"):
            lk.inject(model, cfg)
        elif how == "add_adapter":
            lk.add_adapter(model, "b", cfg)
        else:
            lk.load(model, folder)
    assert_same(before, fingerprint(model))
    monkeypatch.setattr(Linear, "lora_add", original)
    lk.load(model, folder, adapter="c")  # and the model still takes a valid adapter
