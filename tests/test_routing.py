"""Mixed-adapter batches: every strategy equals per-row runs, for every layer kind, in every mode."""

from __future__ import annotations

import pytest
import torch

import lorakit as lk
from tiny_models import CASES, build, randomize_adapters

ATOL = 1e-5
NAMES = ["b", None, "a", "b"]


def _two_adapters(case, dropout=0.0):
    """Adapters of different ranks (padding is exercised) on the same layers."""
    model, targets = build(case)
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules=targets, dropout=dropout), "a")
    lk.add_adapter(model, "b", lk.LoraConfig(r=2, alpha=3, target_modules=targets, dropout=dropout))
    randomize_adapters(model, "a", seed=3)
    randomize_adapters(model, "b", seed=4)
    return model


def _per_row(case, model, inputs, names):
    rows = []
    for row, name in enumerate(names):
        lk.set_active(model, name)
        rows.append(case.output(model, {k: v[row:row + 1] for k, v in inputs.items()}))
    lk.set_active(model, "a")
    return torch.cat(rows)


@pytest.mark.parametrize("strategy", ["auto", "gather", "group"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_every_strategy_equals_per_row_runs_in_inference_mode(case, strategy):
    model = _two_adapters(case)
    inputs = case.make_input(len(NAMES))
    with torch.inference_mode():
        expected = _per_row(case, model, inputs, NAMES)
        with lk.route(model, NAMES, strategy=strategy):
            first = case.output(model, inputs)
            again = case.output(model, inputs)  # a second call: "auto" gathers now, "gather" reads its cache
    torch.testing.assert_close(first, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(again, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", [c for c in CASES if c.name in ("linear", "linear4bit", "gpt2", "llama")],
                         ids=lambda c: c.name)
def test_gathered_gradients_equal_grouped_gradients(case):
    grads = {}
    for strategy in ("gather", "group"):
        model = _two_adapters(case)
        lk.set_trainable(model, ["a", "b"])
        model.train()
        torch.manual_seed(0)
        inputs = case.make_input(len(NAMES))
        with lk.route(model, NAMES, strategy=strategy):
            case.output(model, inputs).float().pow(2).mean().backward()
        grads[strategy] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads["gather"].keys() == grads["group"].keys()
    for name, grad in grads["gather"].items():
        torch.testing.assert_close(grad, grads["group"][name], atol=1e-5, rtol=1e-4)


def test_cache_follows_weight_updates():
    case = next(c for c in CASES if c.name == "llama")
    model = _two_adapters(case)
    inputs = case.make_input(len(NAMES))
    with torch.no_grad():
        with lk.route(model, NAMES, strategy="gather"):
            before = case.output(model, inputs)
            randomize_adapters(model, "b", seed=9)  # in-place copy_ bumps the version the cache checks
            after = case.output(model, inputs)
        expected = _per_row(case, model, inputs, NAMES)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, expected, atol=ATOL, rtol=0)


def test_dropout_in_training_groups_and_keeps_each_adapters_rate():
    case = next(c for c in CASES if c.name == "linear")
    model = _two_adapters(case, dropout=0.5).train()
    inputs = case.make_input(len(NAMES))
    with lk.route(model, NAMES, strategy="gather"):
        out = case.output(model, inputs)
    assert torch.isfinite(out).all()
    layer = model.layer
    assert not lk.layers.routing.can_gather(layer, ("a", "b"))


def test_generate_routes_every_step():
    case = next(c for c in CASES if c.name == "gpt2")
    model = _two_adapters(case)
    prompt = case.make_input(3)["input_ids"][:, :5]
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    expected = []
    for row, name in enumerate(["a", None, "b"]):
        lk.set_active(model, name)
        expected.append(model.generate(prompt[row:row + 1], **settings))
    with torch.inference_mode(), lk.route(model, ["a", None, "b"]):
        routed = model.generate(prompt, **settings)
    torch.testing.assert_close(routed, torch.cat(expected))


def test_unknown_strategy_is_refused():
    case = next(c for c in CASES if c.name == "linear")
    model = _two_adapters(case)
    with pytest.raises(lk.LorakitError, match="strategy must be one of"):
        with lk.route(model, NAMES, strategy="fast"):
            pass


def test_auto_groups_first_then_gathers_when_rows_have_their_own_adapters():
    case = next(c for c in CASES if c.name == "linear")
    model = _two_adapters(case)
    inputs = case.make_input(2)
    with torch.no_grad(), lk.route(model, ["a", "b"]):
        plan = model.layer.lora_routes
        case.output(model, inputs)
        assert not plan._weights  # one call: copying per-row weights would not pay off
        case.output(model, inputs)
        assert id(model.layer) in plan._weights  # reused from here on
