"""lk.combine / lk.resize / lk.extract against known answers: Σ w_i·ΔW_i computed here from the raw factors and
LoraConfig's scaling, direct loop implementations of the TIES and DARE definitions, PEFT's cross terms, and
PEFT loading the saved results."""

from __future__ import annotations

import copy
import json
import math

import peft
import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit.config import lora_scaling
from lorakit.errors import LorakitError
from lorakit.state import lora_layers
from tiny_models import CASES, _ids, _llama, build, randomize_adapters

WEIGHTS = {"a": 1.0, "b": -0.5, "c": 0.75}


def _config_scaling(cfg, name: str) -> float:
    """The scaling a config gives module `name`, computed from its fields (the reference, not the layer's)."""
    return lora_scaling(cfg.rank_for(name), cfg.alpha_for(name), cfg.use_rslora)


def exact_sum(model: nn.Module, weights: dict[str, float]) -> dict[str, torch.Tensor]:
    """Σ w_i·s_i·B_i·A_i per layer as (out, in·kernel) float64, from the raw tensors and each config's scaling."""
    state = model.lorakit_state
    out = {}
    for name, layer in lora_layers(model):
        total = None
        for adapter, w in weights.items():
            if adapter not in layer.lora_adapters:
                continue
            A = layer.lora_A[adapter].detach().double().flatten(1)
            B = layer.lora_B[adapter].detach().double().flatten(1)
            term = w * _config_scaling(state.configs[adapter], name) * (B @ A)
            total = term if total is None else total + term
        if total is not None:
            out[name] = total
    return out


def result_delta(model: nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    """The stored adapter's update, read the same independent way."""
    return exact_sum(model, {adapter: 1.0})


def three_adapters(model: nn.Module, targets) -> nn.Module:
    """a: plain r=4; b: rsLoRA r=6 with a rank pattern; c: r=3 with an alpha pattern and other targets."""
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules=targets), "a")
    names = [n for n, _ in lora_layers(model)]
    lk.add_adapter(model, "b", lk.LoraConfig(r=6, alpha=3, use_rslora=True, target_modules=targets,
                                             rank_pattern={names[0].rsplit(".", 1)[-1]: 2}))
    c_targets = names[: max(1, len(names) // 2)]
    lk.add_adapter(model, "c", lk.LoraConfig(r=3, alpha=5, target_modules=c_targets,
                                             alpha_pattern={names[-1 if len(names) == 1 else 0].rsplit(".", 1)[-1]: 11}))
    for seed, adapter in enumerate("abc"):
        randomize_adapters(model, adapter, seed=seed + 1)
    return model


def assert_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], rtol: float = 2e-6) -> None:
    assert set(got) == set(want)
    for name in want:
        scale = float(want[name].abs().max())
        assert float((got[name] - want[name]).abs().max()) <= rtol * scale + 1e-12, name


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
@pytest.mark.parametrize("method", ["cat", "linear"])
def test_cat_and_untruncated_linear_are_the_exact_weighted_sum(case, method):
    model, targets = build(case)
    three_adapters(model, targets)
    report = lk.combine(model, WEIGHTS, method=method, name="ab")
    assert_close(result_delta(model, "ab"), exact_sum(model, WEIGHTS))
    assert all(layer.kept_energy == pytest.approx(1.0) for layer in report.layers)
    if method == "cat":
        assert all(layer.rank_after == layer.rank_before for layer in report.layers)
    assert model.lorakit_state.active == ("a",)  # the result is added like lk.add_adapter: inactive


def test_combined_adapter_gives_the_summed_outputs():
    model = _llama().eval()
    three_adapters(model, "all-linear")
    lk.combine(model, {"a": 1.0, "b": 1.0}, method="linear", name="ab")
    ids = _ids(2)
    lk.set_active(model, ["a", "b"])
    both = model(input_ids=ids).logits
    lk.set_active(model, "ab")
    torch.testing.assert_close(model(input_ids=ids).logits, both, atol=1e-5, rtol=1e-5)


def test_truncated_linear_is_the_best_rank_k_approximation():
    model = _llama().eval()
    three_adapters(model, ["q_proj", "v_proj"])
    report = lk.combine(model, WEIGHTS, method="linear", name="ab", rank=3)
    want, got = exact_sum(model, WEIGHTS), result_delta(model, "ab")
    for layer in report.layers:
        S = torch.linalg.svdvals(want[layer.module])
        best = want[layer.module].norm() ** 2 - S[:3].pow(2).sum()
        residual = (want[layer.module] - got[layer.module]).norm() ** 2
        assert float(residual) == pytest.approx(float(best), rel=1e-4, abs=1e-10)
        assert layer.kept_energy == pytest.approx(float(S[:3].pow(2).sum() / S.pow(2).sum()), rel=1e-6)
        assert layer.rank_after == 3


def _peft_model_with(model: nn.Module, folders: dict[str, str]):
    base = copy.deepcopy(lk.unload(copy.deepcopy(model), merge=False))
    names = list(folders)
    theirs = peft.PeftModel.from_pretrained(base, folders[names[0]], adapter_name=names[0])
    for name in names[1:]:
        theirs.load_adapter(folders[name], adapter_name=name)
    return theirs


def test_peft_linear_differs_by_its_cross_terms(tmp_path):
    model = _llama().eval()
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), "a")
    lk.add_adapter(model, "b", lk.LoraConfig(r=4, alpha=4, use_rslora=True, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(model, "a", seed=1)
    randomize_adapters(model, "b", seed=2)
    weights = {"a": 1.0, "b": -0.5}
    for name in weights:
        lk.save(model, tmp_path / name, adapter=name)
    theirs = _peft_model_with(model, {n: str(tmp_path / n) for n in weights})
    theirs.add_weighted_adapter(list(weights), list(weights.values()), "mix", combination_type="linear")
    lk.combine(model, weights, method="linear", name="mix")
    exact, ours = exact_sum(model, weights), result_delta(model, "mix")
    state = model.lorakit_state
    for name, layer in lora_layers(model):
        peft_layer = theirs.base_model.model.get_submodule(name)
        peft_delta = peft_layer.get_delta_weight("mix").double()
        # PEFT mixes A and B separately: A' = Σ a_i A_i, B' = Σ b_i B_i with b_i = sqrt(|w_i s_i|), a_i = sign·b_i
        coef = {n: w * _config_scaling(state.configs[n], name) for n, w in weights.items()}
        b = {n: math.sqrt(abs(c)) for n, c in coef.items()}
        a = {n: math.copysign(b[n], coef[n]) for n in coef}
        cross = sum(b[i] * a[j] * layer.lora_B[i].detach().double() @ layer.lora_A[j].detach().double()
                    for i in weights for j in weights if i != j)
        torch.testing.assert_close(peft_delta - exact[name], cross, atol=1e-5, rtol=1e-4)
        assert float(cross.norm()) > 0.1 * float(exact[name].norm())  # the cross terms are not small
        assert float((ours[name] - exact[name]).norm()) < 1e-5 * float(exact[name].norm())


# ---- TIES / DARE / magnitude pruning against the published definitions, written as plain loops ----------
def reference_trim(task: list[float], density: float) -> list[float]:
    """TIES step 1: keep the int(density·n) entries of largest magnitude."""
    keep = int(density * len(task))
    order = sorted(range(len(task)), key=lambda i: -abs(task[i]))
    kept = set(order[:keep])
    return [v if i in kept else 0.0 for i, v in enumerate(task)]


def reference_merge(tasks: list[list[float]], method: str, density: float, masks: list[list[bool]] | None) -> list[float]:
    if method in ("ties", "magnitude_prune"):
        pruned = [reference_trim(t, density) for t in tasks]
    else:  # DARE: drop, then rescale the survivors by 1/density
        pruned = [[v / density if keep else 0.0 for v, keep in zip(t, m)] for t, m in zip(tasks, masks)]
    merged = []
    for entry in range(len(tasks[0])):
        values = [p[entry] for p in pruned]
        if method in ("magnitude_prune", "dare_linear"):
            merged.append(sum(values))
            continue
        sign = 1.0 if sum(values) >= 0 else -1.0  # TIES step 2: elect the sign of the total mass
        agreeing = [v for v in values if v != 0 and math.copysign(1.0, v) == sign]  # step 3: disjoint mean
        merged.append(sum(agreeing) / len(agreeing) if agreeing else 0.0)
    return merged


class TwoLinears(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(10, 7)
        self.second = nn.Linear(7, 9)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))


@pytest.mark.parametrize("method", ["ties", "dare_linear", "dare_ties", "magnitude_prune"])
def test_dense_methods_match_the_published_definitions(method):
    torch.manual_seed(0)
    model = TwoLinears()
    lk.inject(model, lk.LoraConfig(r=2, alpha=4, target_modules=["first", "second"]), "a")
    lk.add_adapter(model, "b", lk.LoraConfig(r=3, alpha=3, use_rslora=True, target_modules=["first", "second"]))
    lk.add_adapter(model, "c", lk.LoraConfig(r=1, alpha=2, target_modules=["second"]))
    for seed, adapter in enumerate("abc"):
        randomize_adapters(model, adapter, seed=seed + 1)
    weights, density, seed = {"a": 0.8, "b": -1.2, "c": 0.5}, 0.4, 7
    lk.combine(model, weights, method=method, name="m", rank=7, density=density, seed=seed)
    got = result_delta(model, "m")
    generator = torch.Generator().manual_seed(seed)  # the documented order: layers, then inputs in weights order
    for name, layer in lora_layers(model):
        tasks, masks = [], []
        for adapter, w in weights.items():
            if adapter not in layer.lora_adapters:
                continue
            delta = exact_sum(model, {adapter: w})[name]
            tasks.append(delta.flatten().tolist())
            if method.startswith("dare"):
                masks.append((torch.rand(delta.shape, generator=generator, dtype=torch.float64) < density).flatten().tolist())
        want = torch.tensor(reference_merge(tasks, method, density, masks), dtype=torch.float64).view(got[name].shape)
        torch.testing.assert_close(got[name], want, atol=1e-6 * float(want.abs().max()), rtol=1e-5)


def test_ties_with_unit_weights_equals_peft_dense_ties():
    """PEFT elects the sign on unweighted trimmed tensors; with weights 1 the definitions coincide."""
    from peft.utils.merge_utils import ties

    torch.manual_seed(0)
    model = TwoLinears()
    lk.inject(model, lk.LoraConfig(r=3, alpha=6, target_modules=["first", "second"]), "a")
    lk.add_adapter(model, "b", lk.LoraConfig(r=2, alpha=2, target_modules=["first", "second"]))
    randomize_adapters(model, "a", seed=1)
    randomize_adapters(model, "b", seed=2)
    lk.combine(model, {"a": 1.0, "b": 1.0}, method="ties", name="m", rank=7, density=0.3)
    got = result_delta(model, "m")
    for name, _ in lora_layers(model):
        tasks = [exact_sum(model, {n: 1.0})[name] for n in "ab"]
        want = ties(tasks, torch.ones(2, dtype=torch.float64), 0.3)
        torch.testing.assert_close(got[name], want, atol=1e-6 * float(want.abs().max()), rtol=1e-5)


def test_dare_is_seeded():
    def run(seed: int) -> torch.Tensor:
        torch.manual_seed(0)
        model = TwoLinears()
        lk.inject(model, lk.LoraConfig(r=2, target_modules=["first"]), "a")
        randomize_adapters(model, "a")
        lk.combine(model, {"a": 1.0}, method="dare_linear", name="m", rank=7, density=0.5, seed=seed)
        return result_delta(model, "m")["first"]

    torch.testing.assert_close(run(3), run(3))
    assert not torch.allclose(run(3), run(4))


# ---- saved results load in PEFT --------------------------------------------------------------------------
def test_combined_result_with_rank_pattern_loads_in_peft_with_the_same_outputs(tmp_path):
    model = _llama().eval()
    three_adapters(model, "all-linear")
    lk.combine(model, WEIGHTS, method="cat", name="ab")  # ranks differ per layer: 13, 9, 10, ...
    lk.save(model, tmp_path / "ab", adapter="ab")
    config = json.loads((tmp_path / "ab" / "adapter_config.json").read_text())
    assert config["rank_pattern"]
    theirs = peft.PeftModel.from_pretrained(lk.unload(copy.deepcopy(model), merge=False), str(tmp_path / "ab")).eval()
    ids = _ids(2)
    lk.set_active(model, "ab")
    torch.testing.assert_close(theirs(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


# ---- resize ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("target", [{"rank": 2}, {"energy": 0.8}])
def test_resize_keeps_exactly_the_reported_energy(target, tmp_path):
    model = _llama().eval()
    three_adapters(model, "all-linear")
    lk.set_active(model, ["a", "b"])
    before = exact_sum(model, {"b": 1.0})
    report = lk.resize(model, "b", **target)
    after = result_delta(model, "b")
    assert model.lorakit_state.active == ("a", "b")
    for layer in report.layers:
        old, new = before[layer.module], after[layer.module]
        kept = float(new.norm() ** 2 / old.norm() ** 2)
        lost = float((old - new).norm() ** 2 / old.norm() ** 2)
        assert layer.kept_energy == pytest.approx(kept, rel=1e-5)
        assert lost == pytest.approx(1 - kept, abs=1e-5)
        assert torch.linalg.matrix_rank(new.float()) <= layer.rank_after
        if "energy" in target:
            assert layer.kept_energy >= 0.8 - 1e-9
            S = torch.linalg.svdvals(old)
            assert float(S[:layer.rank_after - 1].pow(2).sum() / S.pow(2).sum()) < 0.8  # the fewest directions
        else:
            assert layer.rank_after == min(2, layer.rank_before)
    lk.save(model, tmp_path / "b", adapter="b")
    theirs = peft.PeftModel.from_pretrained(lk.unload(copy.deepcopy(model), merge=False), str(tmp_path / "b")).eval()
    lk.set_active(model, "b")
    ids = _ids(2)
    torch.testing.assert_close(theirs(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


# ---- extract -------------------------------------------------------------------------------------------------
def test_extract_from_a_merged_model_returns_the_update():
    torch.manual_seed(0)
    base = _llama().eval()
    tuned = copy.deepcopy(base)
    lk.inject(tuned, lk.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    randomize_adapters(tuned, std=0.3)
    want = exact_sum(tuned, {"default": 1.0})
    merged = lk.unload(tuned, merge=True)
    report = lk.extract(base, merged, rank=4)
    got = result_delta(base, "default")
    assert set(got) == set(want)
    for name in want:
        weight_scale = float(merged.get_submodule(name).weight.abs().max())  # float32 round-off of W + ΔW
        torch.testing.assert_close(got[name], want[name], atol=4e-6 * weight_scale, rtol=1e-4)
    assert report.min_kept_energy == pytest.approx(1.0, abs=1e-6)
    assert report.not_captured == []


def test_extract_lists_changes_a_lora_pair_cannot_hold():
    base = _llama().eval()
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        tuned.model.layers[0].self_attn.q_proj.weight.add_(0.01)
        tuned.model.norm.weight.add_(0.5)
    report = lk.extract(base, tuned, rank=1)
    assert [layer.module for layer in report.layers] == ["model.layers.0.self_attn.q_proj"]
    assert report.not_captured == ["model.norm.weight"]


def test_full_fine_tune_extraction_improves_as_energy_rises():
    torch.manual_seed(0)
    base = _llama().eval()
    tuned = copy.deepcopy(base).train()
    optimizer = torch.optim.Adam([p for n, p in tuned.named_parameters() if "proj" in n], lr=3e-3)
    for _ in range(3):
        ids = _ids(4)
        loss = tuned(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    tuned.eval()
    ids = _ids(4)
    with torch.no_grad():
        target = tuned(input_ids=ids).logits
    errors = []
    for energy in (0.3, 0.7, 0.99):
        model = copy.deepcopy(base)
        lk.extract(model, tuned, energy=energy)
        with torch.no_grad():
            errors.append(float((model(input_ids=ids).logits - target).norm()))
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.5 * errors[0]


# ---- refusals --------------------------------------------------------------------------------------------------
def test_dora_inputs_are_refused_and_the_model_is_untouched():
    model = _llama().eval()
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["q_proj"]), "a")
    lk.add_adapter(model, "d", lk.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(LorakitError, match="DoRA.*lk.extract"):
        lk.combine(model, {"a": 1.0, "d": 1.0}, method="cat", name="x")
    with pytest.raises(LorakitError, match="DoRA"):
        lk.resize(model, "d", rank=1)
    assert set(model.lorakit_state.configs) == {"a", "d"}
    assert all("x" not in layer.lora_adapters for _, layer in lora_layers(model))


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "ties"}, "needs density"),
    ({"method": "cat", "rank": 2}, "takes no rank"),
    ({"method": "linear", "density": 0.5}, "density applies"),
    ({"method": "mean"}, "method must be one of"),
    ({"name": "a"}, "already exists"),
])
def test_bad_combine_arguments_are_named(kwargs, message):
    model = _llama().eval()
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["q_proj"]), "a")
    with pytest.raises(LorakitError, match=message):
        lk.combine(model, {"a": 1.0}, **({"name": "x"} | kwargs))
    with pytest.raises(LorakitError, match="no adapter named 'zz'"):
        lk.combine(model, {"zz": 1.0}, name="x")
    with pytest.raises(LorakitError, match="rank= or energy="):
        lk.resize(model, "a", rank=2, energy=0.5)
