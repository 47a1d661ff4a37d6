"""lk.combine / lk.resize / lk.extract against known answers: Σ w_i·ΔW_i computed here from the raw factors and
LoraConfig's scaling, direct loop implementations of the TIES and DARE definitions, PEFT's cross terms, PEFT
loading the saved results, and for DoRA sources PEFT's own DoRA merge and forward."""

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


# ---- dense helpers ----------------------------------------------------------------------------------------
def test_trim_keeps_the_first_of_tied_entries_like_the_reference():
    from lorakit.arithmetic.dense import trim_

    task = [1.0, -1.0, 1.0, 0.5, -1.0, 2.0, 0.0, -0.5]
    for density in (0.0, 0.25, 0.375, 0.5, 0.75, 1.0):
        got = trim_(torch.tensor([task], dtype=torch.float64).view(1, 2, 4), density).flatten().tolist()
        assert got == reference_trim(task, density), density


@pytest.mark.parametrize("shape", [(40, 25), (25, 40)])
def test_gram_spectrum_truncation_equals_the_svd_truncation(shape):
    from lorakit.arithmetic.factors import GramSpectrum

    gen = torch.Generator().manual_seed(0)
    q = min(shape)
    U = torch.linalg.qr(torch.randn(shape[0], q, generator=gen, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(shape[1], q, generator=gen, dtype=torch.float64))[0]
    S = torch.logspace(0, -5, q, dtype=torch.float64)  # a wide spread of singular values
    M = U * S @ V.T
    spectrum = GramSpectrum.of(M)
    torch.testing.assert_close(spectrum.S, S, atol=1e-7, rtol=0)  # σ² to float64 round-off of σ_1²
    for k in (1, 5, q):
        got = spectrum.truncated(k)
        want = U[:, :k] * S[:k] @ V[:, :k].T
        assert float((got.dense() - want).abs().max()) < 1e-12
        assert spectrum.kept_fraction(k) == pytest.approx(float(S[:k].pow(2).sum() / S.pow(2).sum()), rel=1e-12)


# ---- DoRA sources, against PEFT's DoRA --------------------------------------------------------------------------
def dora_model(targets=("q_proj", "v_proj", "down_proj")) -> nn.Module:
    """A tiny llama with plain LoRA "a" and DoRA "d" (random A, B and magnitudes away from ||W||)."""
    torch.manual_seed(0)
    model = _llama().eval()
    lk.inject(model, lk.LoraConfig(r=3, alpha=6, target_modules=list(targets)), "a")
    lk.add_adapter(model, "d", lk.LoraConfig(r=4, alpha=8, target_modules=list(targets[:2]), use_dora=True))
    randomize_adapters(model, "a", seed=1)
    randomize_adapters(model, "d", seed=2)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            if "d" in layer.lora_adapters:
                m = layer.lora_file_tensors("d")["lora_magnitude_vector"]
                m.mul_(1 + 0.3 * torch.randn(m.shape, generator=gen))
    return model


def peft_effective_updates(model: nn.Module, adapter: str, tmp_path) -> dict[str, torch.Tensor]:
    """W' - W per layer of `adapter`, W' from PEFT's own merge of the saved adapter (float64)."""
    lk.save(model, tmp_path / adapter, adapter=adapter)
    merged = _peft_model_with(model, {adapter: str(tmp_path / adapter)}).merge_and_unload()
    return {name: merged.get_submodule(name).weight.detach().double() - layer.weight.detach().double()
            for name, layer in lora_layers(model) if adapter in layer.lora_adapters}


def model_with_weights_plus(model: nn.Module, deltas: dict[str, torch.Tensor]) -> nn.Module:
    """The plain base of `model` with W + delta on the named layers (the reference network)."""
    reference = lk.unload(copy.deepcopy(model), merge=False)
    with torch.no_grad():
        for name, delta in deltas.items():
            weight = reference.get_submodule(name).weight
            weight.copy_((weight.double() + delta).float())
    return reference.eval()


@pytest.mark.parametrize("weight", [1.0, -0.6, -2.0])
def test_one_dora_source_gives_an_exact_dora_adapter(weight, tmp_path):
    model = dora_model()
    want = {n: weight * d for n, d in peft_effective_updates(model, "d", tmp_path).items()}
    report = lk.combine(model, {"d": weight}, method="linear", name="m")
    assert model.lorakit_state.configs["m"].use_dora and all(layer.kept_energy == 1.0 for layer in report.layers)
    for layer in report.layers:
        assert layer.norm == pytest.approx(float(want[layer.module].norm()), rel=1e-5)
    ids = _ids(2)
    reference = model_with_weights_plus(model, want)(input_ids=ids).logits
    lk.set_active(model, "m")
    torch.testing.assert_close(model(input_ids=ids).logits, reference, atol=2e-5, rtol=1e-4)
    lk.save(model, tmp_path / "m", adapter="m")
    theirs = _peft_model_with(model, {"m": str(tmp_path / "m")}).eval()
    torch.testing.assert_close(theirs(input_ids=ids).logits, reference, atol=2e-5, rtol=1e-4)
    if weight == 1.0:  # the source itself, returned exactly
        for _, layer in lora_layers(model):
            if "d" in layer.lora_adapters:
                s = layer.lora_adapters["d"].scaling
                torch.testing.assert_close(layer.lora_B["m"], s * layer.lora_B["d"])
                torch.testing.assert_close(layer.lora_A["m"], layer.lora_A["d"])
                torch.testing.assert_close(layer.lora_file_tensors("m")["lora_magnitude_vector"],
                                           layer.lora_file_tensors("d")["lora_magnitude_vector"])


def test_resizing_a_dora_adapter_truncates_its_direction_and_keeps_its_magnitude(tmp_path):
    model = dora_model()
    ids = _ids(2)
    want = model_with_weights_plus(model, peft_effective_updates(model, "d", tmp_path))(input_ids=ids).logits
    lk.resize(model, "d", rank=4)  # at its rank: the same adapter
    lk.set_active(model, "d")
    torch.testing.assert_close(model(input_ids=ids).logits, want, atol=2e-5, rtol=1e-4)
    direction = exact_sum(model, {"d": 1.0})
    magnitudes = {n: layer.lora_file_tensors("d")["lora_magnitude_vector"].detach().clone()
                  for n, layer in lora_layers(model) if "d" in layer.lora_adapters}
    report = lk.resize(model, "d", rank=2)
    assert "magnitude kept" in report.method
    after = exact_sum(model, {"d": 1.0})
    for layer in report.layers:
        S = torch.linalg.svdvals(direction[layer.module])
        residual = float((direction[layer.module] - after[layer.module]).norm() ** 2)
        assert residual == pytest.approx(float(S[2:].pow(2).sum()), rel=1e-4)
        assert layer.kept_energy == pytest.approx(float(S[:2].pow(2).sum() / S.pow(2).sum()), rel=1e-6)
        torch.testing.assert_close(model.get_submodule(layer.module).lora_file_tensors("d")["lora_magnitude_vector"],
                                   magnitudes[layer.module], atol=0, rtol=0)
    assert model.lorakit_state.configs["d"].use_dora
    lk.save(model, tmp_path / "d2", adapter="d")
    theirs = _peft_model_with(model, {"d": str(tmp_path / "d2")}).eval()
    torch.testing.assert_close(theirs(input_ids=ids).logits, model(input_ids=ids).logits, atol=2e-5, rtol=1e-4)


def test_dora_as_update_combines_the_effective_updates(tmp_path):
    model = dora_model()
    weights = {"d": 0.7, "a": -0.5}
    effective = peft_effective_updates(model, "d", tmp_path)
    lora = exact_sum(model, {"a": 1.0})
    want = {n: weights["a"] * lora[n] + (weights["d"] * effective[n] if n in effective else 0) for n in lora}
    report = lk.combine(model, weights, method="linear", name="full", rank=64, dora_as_update=True)  # >= min(out, in)
    got = result_delta(model, "full")
    assert not model.lorakit_state.configs["full"].use_dora
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5 * float(want[name].abs().max()), rtol=1e-4)
    assert all(layer.kept_energy == pytest.approx(1.0) for layer in report.layers)
    report = lk.combine(model, weights, method="linear", name="r2", rank=2, dora_as_update=True)
    got = result_delta(model, "r2")
    for layer in report.layers:
        S = torch.linalg.svdvals(want[layer.module])
        assert layer.rank_after == 2
        assert layer.kept_energy == pytest.approx(float(S[:2].pow(2).sum() / S.pow(2).sum()), rel=1e-4)
        residual = float((want[layer.module] - got[layer.module]).norm() ** 2)
        assert residual == pytest.approx(float(S[2:].pow(2).sum()), rel=1e-3)
    lk.combine(model, weights, method="ties", name="t", density=0.5, rank=64, dora_as_update=True)
    got = result_delta(model, "t")
    for name in want:  # TIES on the same task vectors, directly
        tasks = [weights["a"] * lora[name]] + ([weights["d"] * effective[name]] if name in effective else [])
        expected = torch.tensor(reference_merge([t.flatten().tolist() for t in tasks], "ties", 0.5, None),
                                dtype=torch.float64).view(got[name].shape)
        torch.testing.assert_close(got[name], expected, atol=1e-5 * float(expected.abs().max()), rtol=1e-4)


@pytest.mark.parametrize("weights, kwargs, message", [
    ({"a": 1.0, "d": 1.0}, {"method": "cat"}, "no DoRA adapter.*dora_as_update=True"),
    ({"d": 1.0, "a": 0.0}, {"method": "linear"}, "no DoRA adapter"),
    ({"d": 1.0}, {"method": "ties", "density": 0.5}, "trims or drops.*dora_as_update"),
    ({"d": 1.0}, {"method": "linear", "rank": 2}, "lk.resize"),
    ({"d": 1.0}, {"method": "cat", "dora_as_update": True}, "dense; use method='linear'"),
    ({"d": 1.0}, {"method": "linear", "dora_as_update": True}, "give rank=k"),
    ({"a": 1.0}, {"method": "linear", "dora_as_update": True}, "none of .* is DoRA"),
])
def test_dora_combinations_without_an_exact_result_are_refused(weights, kwargs, message):
    model = dora_model()
    with pytest.raises(LorakitError, match=message):
        lk.combine(model, weights, name="x", **kwargs)
    assert set(model.lorakit_state.configs) == {"a", "d"}
    assert all("x" not in layer.lora_adapters for _, layer in lora_layers(model))


def test_analysis_of_a_dora_adapter_is_refused():
    model = dora_model()
    with pytest.raises(LorakitError, match="DoRA.*lk.extract"):
        lk.analysis.analyze(model, "d")


# ---- refusals --------------------------------------------------------------------------------------------------
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
