"""The core checks, run over every base kind and tiny GPT-2, Llama, BERT and T5 models."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit.layers import LoraLayer
from tiny_models import CASES, build, randomize_adapters

ATOL = 1e-5


def _inject(case, adapter="default", **overrides):
    model, targets = build(case)
    cfg = lk.LoraConfig(r=4, alpha=8, target_modules=targets, **overrides)
    return lk.inject(model, cfg, adapter), cfg


def _train_steps(case, model, steps=3):
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    for step in range(steps):
        torch.manual_seed(100 + step)
        out = case.output(model, case.make_input(3))
        out.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@pytest.fixture(params=CASES, ids=lambda c: c.name)
def case(request):
    return request.param


def test_zero_init_adapter_equals_base(case):
    base, _ = build(case)
    model, _ = _inject(case)
    inputs = case.make_input(2)
    with torch.no_grad():
        assert torch.equal(case.output(model, inputs), case.output(base, inputs))


def test_training_changes_only_adapter_parameters(case):
    model, _ = _inject(case)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train_steps(case, model)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed, "training changed nothing"
    assert all(".lora_A." in n or ".lora_B." in n for n in changed), changed
    assert any(".lora_B." in n for n in changed)


def test_bias_and_modules_to_save_train_when_asked():
    from tiny_models import CASES as all_cases

    gpt2 = next(c for c in all_cases if c.name == "gpt2")
    model, _ = _inject(gpt2, bias="lora_only", modules_to_save=["ln_f"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train_steps(gpt2, model)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert any(n.endswith("c_attn.bias") for n in changed)
    assert any(".modules_to_save.default." in n for n in changed)
    assert not any(".original_module." in n for n in changed)
    assert all(".lora_" in n or n.endswith(".bias") or ".modules_to_save." in n for n in changed), changed


def test_merge_equals_unmerged_and_unmerge_restores(case):
    model, _ = _inject(case)
    if not case.mergeable:
        with pytest.raises(lk.LorakitError, match="4 bits"):
            lk.merge(model)
        return
    base_weights = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    randomize_adapters(model)
    inputs = case.make_input(2)
    with torch.no_grad():
        unmerged = case.output(model, inputs)
        lk.merge(model)
        merged = case.output(model, inputs)
        torch.testing.assert_close(merged, unmerged, atol=ATOL, rtol=0)
        lk.unmerge(model)
        for n, p in model.named_parameters():
            if n in base_weights:
                torch.testing.assert_close(p, base_weights[n], atol=1e-6, rtol=0)
        torch.testing.assert_close(case.output(model, inputs), unmerged, atol=ATOL, rtol=0)


def test_qlora_trains_and_dequantized_merge_matches():
    from tiny_models import _llama

    torch.manual_seed(0)
    model = lk.quantize_model(_llama(), "nf4", compute_dtype=torch.float32)
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    frozen = {n: b.clone() for n, b in model.named_buffers()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(1, 96, (4, 12))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(b, frozen[n]) for n, b in model.named_buffers())
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".lora_" in n for n in changed)
    model.eval()
    with torch.no_grad():
        unmerged = model(ids).logits
        plain = lk.unload(model, merge=True, dequantize=True)
        torch.testing.assert_close(plain(ids).logits, unmerged, atol=ATOL, rtol=0)


def test_thousand_merge_cycles_stay_within_round_off():
    model, _ = _inject(CASES[0])
    randomize_adapters(model)
    weight = model.layer.weight.detach().clone()
    for _ in range(1000):
        lk.merge(model)
        lk.unmerge(model)
    drift = (model.layer.weight - weight).abs().max().item()
    assert drift <= 64 * torch.finfo(torch.float32).eps * weight.abs().max().item()


def test_two_adapters_are_isolated(case):
    model, cfg = _inject(case, adapter="a")
    lk.add_adapter(model, "b", cfg)
    randomize_adapters(model, "b", seed=7)
    inputs = case.make_input(2)
    with torch.no_grad():
        out_a = case.output(model, inputs)
    b_before = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(".b")}
    _train_steps(case, model)  # trains "a" only
    for n, p in model.named_parameters():
        if n in b_before:
            assert torch.equal(p, b_before[n]), n
    randomize_adapters(model, "b", seed=8)  # touching b must not move a's output
    lk.set_active(model, "a")
    with torch.no_grad():
        trained_a = case.output(model, inputs)
        randomize_adapters(model, "b", seed=9)
        assert torch.equal(case.output(model, inputs), trained_a)
        lk.set_active(model, None)
        assert not torch.allclose(case.output(model, inputs), trained_a) or torch.allclose(out_a, trained_a)


def test_summed_activation_equals_sum_of_deltas(case):
    model, cfg = _inject(case, adapter="a")
    lk.add_adapter(model, "b", cfg)
    randomize_adapters(model, "a", seed=1)
    randomize_adapters(model, "b", seed=2)
    for _, layer in model.named_modules():
        if isinstance(layer, LoraLayer) and case.mergeable:
            lk.set_active(model, ["a", "b"])
            w = layer.weight.detach().clone()
            lk.merge(model)
            expected = w + layer.lora_delta("a") + layer.lora_delta("b")
            torch.testing.assert_close(layer.weight.detach(), expected, atol=1e-6, rtol=0)
            lk.unmerge(model)
    if case.single_layer:
        inputs = case.make_input(2)
        with torch.no_grad():
            outs = {}
            for active in (None, "a", "b", ["a", "b"]):
                lk.set_active(model, active)
                outs[str(active)] = case.output(model, inputs)
        summed = outs["a"] + outs["b"] - outs["None"]
        torch.testing.assert_close(outs[str(["a", "b"])], summed, atol=ATOL, rtol=0)


def test_disabled_gives_base_output_even_when_merged(case):
    base, _ = build(case)
    model, _ = _inject(case)
    randomize_adapters(model)
    inputs = case.make_input(2)
    with torch.no_grad():
        expected = case.output(base, inputs)
        with lk.disabled(model):
            torch.testing.assert_close(case.output(model, inputs), expected, atol=0, rtol=0)
        if case.mergeable:
            lk.merge(model)
            with lk.disabled(model):
                torch.testing.assert_close(case.output(model, inputs), expected, atol=ATOL, rtol=0)
        assert not torch.allclose(case.output(model, inputs), expected, atol=ATOL)


def test_unload_leaves_plain_model_with_original_names(case):
    base, _ = build(case)
    for merge in (True, False):
        model, _ = _inject(case, modules_to_save=[])
        randomize_adapters(model)
        inputs = case.make_input(2)
        with torch.no_grad():
            adapted = case.output(model, inputs)
            plain = lk.unload(model, merge=merge, dequantize=not case.mergeable)
            assert not any(isinstance(m, LoraLayer) for m in plain.modules())
            assert not hasattr(plain, "lorakit_state")
            if case.mergeable:
                assert [n for n, _ in plain.named_parameters()] == [n for n, _ in base.named_parameters()]
                assert [type(m) for m in plain.modules()] == [type(m) for m in base.modules()]
            expected = adapted if merge else case.output(base, inputs)
            torch.testing.assert_close(case.output(plain, inputs), expected, atol=ATOL, rtol=0)


def test_routed_rows_equal_per_adapter_runs(case):
    model, cfg = _inject(case, adapter="a")
    lk.add_adapter(model, "b", cfg)
    randomize_adapters(model, "a", seed=3)
    randomize_adapters(model, "b", seed=4)
    inputs = case.make_input(3)
    names = ["b", None, "a"]
    with torch.no_grad():
        with lk.route(model, names):
            routed = case.output(model, inputs)
        for row, name in enumerate(names):
            lk.set_active(model, name)
            single = {k: v[row:row + 1] for k, v in inputs.items()}
            torch.testing.assert_close(routed[row:row + 1], case.output(model, single), atol=ATOL, rtol=0)


def test_injected_model_deepcopies_and_pickles(case):
    model, _ = _inject(case)
    randomize_adapters(model)
    inputs = case.make_input(2)
    clone = pickle.loads(pickle.dumps(copy.deepcopy(model)))
    with torch.no_grad():
        torch.testing.assert_close(case.output(clone, inputs), case.output(model, inputs), atol=0, rtol=0)


def test_rslora_scaling_and_patterns():
    model, _ = build(next(c for c in CASES if c.name == "llama"))
    cfg = lk.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=True,
                        rank_pattern={r"layers\.1\.self_attn\.q_proj": 2}, alpha_pattern={"v_proj": 3})
    lk.inject(model, cfg)
    q0 = model.model.layers[0].self_attn.q_proj
    q1 = model.model.layers[1].self_attn.q_proj
    v0 = model.model.layers[0].self_attn.v_proj
    assert q0.lora_adapters["default"].scaling == pytest.approx(8 / 2.0)
    assert q1.lora_A["default"].shape[0] == 2 and q1.lora_adapters["default"].scaling == pytest.approx(8 / 2 ** 0.5)
    assert v0.lora_adapters["default"].scaling == pytest.approx(3 / 2.0)


def test_dropout_only_touches_the_adapter_input():
    model = lk.inject(nn.Sequential(nn.Linear(8, 8)), lk.LoraConfig(r=2, dropout=0.5, target_modules=["0"]))
    randomize_adapters(model)
    x = torch.randn(4, 8)
    model.train()
    with torch.no_grad(), lk.disabled(model):
        base = model(x)
    torch.manual_seed(0)
    a = model(x)
    torch.manual_seed(0)
    b = model(x)
    torch.testing.assert_close(a, b)  # deterministic given the seed
    model.eval()
    lora_eval = model(x) - base
    assert not torch.allclose(a - base, lora_eval)  # dropout acted in training ...
    assert torch.isfinite(a).all()


def test_subclass_of_linear_keeps_its_forward():
    class Doubling(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    model = nn.Sequential(Doubling(4, 4))
    x = torch.randn(2, 4)
    expected = model(x)
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["0"]))
    torch.testing.assert_close(model(x), expected)
    assert isinstance(model[0], Doubling)
    clone = pickle.loads(pickle.dumps(model))
    torch.testing.assert_close(clone(x), expected)
    lk.unload(model)
    assert type(model[0]) is Doubling


def test_merging_into_a_tied_weight_is_refused():
    from tiny_models import _gpt2

    model = lk.inject(_gpt2(), lk.LoraConfig(r=2, target_modules=["wte"]))
    weight = model.transformer.wte.weight.detach().clone()
    with pytest.raises(lk.LorakitError, match="tied"):
        lk.merge(model)
    with pytest.raises(lk.LorakitError, match="tied"):
        lk.unload(model, merge=True)
    assert torch.equal(model.transformer.wte.weight, weight)
