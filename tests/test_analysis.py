"""lk.analysis against known answers: φ = 1 / 0 / max(i, j)/d for identical / orthogonal / random subspaces,
amplification on weights with a known SVD, spectra from factors equal to dense ones, the model-level report,
its figures, and the CLI commands combine / resize / extract / analyze on a tiny saved model."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from typer.testing import CliRunner

import lorakit as lk
from lorakit.analysis import (
    amplification,
    delta_subspace_similarity,
    effective_rank,
    singular_values,
    subspace_similarity,
)
from lorakit.cli import app
from lorakit.errors import LorakitError
from lorakit.state import lora_layers
from tiny_models import _llama, randomize_adapters


def orthonormal(d: int, k: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(d, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))[0]


def test_identical_subspaces_give_one_everywhere():
    A = torch.randn(8, 40, dtype=torch.float64)
    grid = subspace_similarity(A, A)
    assert grid.shape == (8, 8)
    torch.testing.assert_close(grid, torch.ones(8, 8, dtype=torch.float64))


def test_same_span_in_another_basis_gives_one_at_full_rank():
    A1 = torch.randn(6, 30, dtype=torch.float64)
    A2 = torch.randn(6, 6, dtype=torch.float64) @ A1  # same row space, other basis and spectrum
    assert float(subspace_similarity(A1, A2)[-1, -1]) == pytest.approx(1.0, abs=1e-12)


def test_a_subspace_inside_a_larger_one_gives_one():
    basis = orthonormal(50, 16, seed=0)
    A_small = torch.randn(4, 4, dtype=torch.float64) @ basis[:, :4].T
    A_large = torch.randn(16, 16, dtype=torch.float64) @ basis.T
    grid = subspace_similarity(A_small, A_large)
    assert grid.shape == (4, 16)
    assert float(grid[-1, -1]) == pytest.approx(1.0, abs=1e-12)  # span(A_small) ⊂ span(A_large)


def test_orthogonal_subspaces_give_zero():
    basis = orthonormal(40, 12, seed=1)
    grid = subspace_similarity(basis[:, :4].T, basis[:, 4:].T)
    assert grid.shape == (4, 8)
    assert float(grid.abs().max()) < 1e-12


def test_random_gaussian_subspaces_match_their_expectation():
    """For uniformly random subspaces of R^d, E ||U_iᵀ U_j||_F² = i·j/d, so E φ(i, j) = max(i, j)/d."""
    d, r1, r2, trials = 64, 4, 16, 200
    generator = torch.Generator().manual_seed(0)
    total = torch.zeros(r1, r2, dtype=torch.float64)
    for _ in range(trials):
        A1 = torch.randn(r1, d, generator=generator, dtype=torch.float64)
        A2 = torch.randn(r2, d, generator=generator, dtype=torch.float64)
        total += subspace_similarity(A1, A2)
    i = torch.arange(1, r1 + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, r2 + 1, dtype=torch.float64)[None, :]
    expected = torch.maximum(i, j) / d
    torch.testing.assert_close(total / trials, expected, atol=0.02, rtol=0.1)


def test_delta_similarity_uses_the_update_directions():
    basis_in, basis_out = orthonormal(30, 6, seed=2), orthonormal(20, 6, seed=3)
    delta1 = basis_out[:, :3] @ torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)) @ basis_in[:, :3].T
    delta2 = (basis_out[:, 3:], basis_in[:, 3:].T)  # as factors (B, A): orthogonal on both sides
    assert delta_subspace_similarity(delta1, delta1).shape == (3, 3)
    torch.testing.assert_close(delta_subspace_similarity(delta1, delta1), torch.ones(3, 3, dtype=torch.float64))
    assert float(delta_subspace_similarity(delta1, delta2).abs().max()) < 1e-12
    assert float(delta_subspace_similarity(delta1, delta2, side="left").abs().max()) < 1e-12


def test_spectrum_from_factors_equals_the_dense_one_and_effective_rank():
    B, A = torch.randn(20, 5, dtype=torch.float64), torch.randn(5, 30, dtype=torch.float64)
    torch.testing.assert_close(singular_values((B, A)), torch.linalg.svdvals(B @ A)[:5])
    S = torch.tensor([3.0, 2.0, 1.0])  # energy shares 9/14, 13/14, 14/14
    assert (effective_rank(S, 0.6), effective_rank(S, 0.9), effective_rank(S, 0.99)) == (1, 2, 3)
    assert effective_rank(torch.zeros(3)) == 0


def test_amplification_on_a_weight_with_known_singular_vectors():
    out_f, in_f, r = 24, 40, 3
    U, V = orthonormal(out_f, out_f, seed=4), orthonormal(in_f, out_f, seed=5)
    sigma = torch.linspace(10, 1, out_f, dtype=torch.float64)
    W = U @ torch.diag(sigma) @ V.T
    along_top = U[:, :r] @ torch.diag(torch.tensor([0.5, 0.4, 0.3], dtype=torch.float64)) @ V[:, :r].T
    top = amplification(along_top, W)
    assert top.rank == r
    assert top.on_delta == pytest.approx(float(sigma[:r].pow(2).sum().sqrt()), rel=1e-5)  # ΔW's directions = W's top
    assert top.on_weight == pytest.approx(top.on_delta, rel=1e-5)
    assert top.factor == pytest.approx(top.delta_norm / top.on_delta)
    along_bottom = U[:, -r:] @ V[:, -r:].T
    bottom = amplification(along_bottom, W)
    assert bottom.on_delta == pytest.approx(float(sigma[-r:].pow(2).sum().sqrt()), rel=1e-5)
    assert bottom.factor > top.factor  # directions W barely uses are amplified more
    assert bottom.on_delta < bottom.on_random < bottom.on_weight
    assert top.weight_norm == pytest.approx(float(sigma.pow(2).sum().sqrt()), rel=1e-6)


def two_adapters() -> torch.nn.Module:
    model = _llama().eval()
    lk.inject(model, lk.LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"]), "a")
    lk.add_adapter(model, "b", lk.LoraConfig(r=6, alpha=6, use_rslora=True, target_modules=["q_proj"]))
    randomize_adapters(model, "a", seed=1)
    randomize_adapters(model, "b", seed=2)
    return model


def test_analyze_reports_every_layer_against_the_pure_functions(tmp_path):
    model = two_adapters()
    result = lk.analysis.analyze(model, "a", "b")
    assert [x.module for x in result.layers] == [n for n, layer in lora_layers(model) if "a" in layer.lora_adapters]
    for entry in result.layers:
        layer = model.get_submodule(entry.module)
        delta = layer.lora_delta("a").double()
        torch.testing.assert_close(entry.singular_values, torch.linalg.svdvals(delta)[:2], rtol=1e-5, atol=1e-9)
        assert entry.norm == pytest.approx(float(delta.norm()), rel=1e-5)
        dense = amplification(delta, layer.weight, rank=2)
        assert entry.amplification.factor == pytest.approx(dense.factor, rel=1e-4)
        if "q_proj" in entry.module:
            torch.testing.assert_close(entry.similarity_A, subspace_similarity(layer.lora_A["a"], layer.lora_A["b"]))
            assert entry.similarity_A.shape == entry.similarity_delta.shape == (2, 6)
        else:
            assert entry.similarity_A is None
    written = json.loads(json.dumps(result.to_dict()))
    assert written["layers"][0]["amplification"]["factor"] == pytest.approx(result.layers[0].amplification.factor)

    from lorakit.analysis.figures import plot_similarity, plot_spectra

    paths = [plot_spectra(result, tmp_path), *plot_similarity(result, tmp_path, "A")]
    assert [p.name for p in paths] == ["spectra.png", "similarity_A_q_proj.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)


def test_cli_combine_resize_extract_analyze(tmp_path):
    base = _llama().eval()
    base.save_pretrained(tmp_path / "base")
    model = copy.deepcopy(base)
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules="all-linear"), "a")
    lk.add_adapter(model, "b", lk.LoraConfig(r=2, alpha=2, target_modules=["q_proj"]))
    lk.add_adapter(model, "d", lk.LoraConfig(r=2, alpha=2, target_modules=["q_proj"], use_dora=True))
    randomize_adapters(model, "a", seed=1)
    randomize_adapters(model, "b", seed=2)
    randomize_adapters(model, "d", seed=3)
    for name in "abd":
        lk.save(model, tmp_path / name, adapter=name)
    runner, folder = CliRunner(), str(tmp_path / "base")

    def run(*args: str) -> str:
        result = runner.invoke(app, list(args), catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output

    run("combine", str(tmp_path / "a"), str(tmp_path / "b"), "--weights", "1,-0.5", "--method", "cat",
        "--model", folder, "--out", str(tmp_path / "ab"))
    assert json.loads((tmp_path / "ab" / "adapter_config.json").read_text())["rank_pattern"]
    run("resize", str(tmp_path / "ab"), "--rank", "3", "--model", folder, "--out", str(tmp_path / "ab3"))
    assert json.loads((tmp_path / "ab3" / "adapter_config.json").read_text())["r"] == 3
    refused = runner.invoke(app, ["combine", str(tmp_path / "d"), str(tmp_path / "a"), "--rank", "4", "--model", folder,
                                  "--out", str(tmp_path / "da")])
    assert isinstance(refused.exception, LorakitError) and "--dora-as-update" in str(refused.exception)
    assert not (tmp_path / "da").exists()
    run("combine", str(tmp_path / "d"), str(tmp_path / "a"), "--dora-as-update", "--rank", "4", "--model", folder,
        "--out", str(tmp_path / "da"))
    assert json.loads((tmp_path / "da" / "adapter_config.json").read_text())["use_dora"] is False

    merged = lk.unload(model.cpu(), merge=True)  # "a" is active: the merged model is base + ΔW_a
    merged.save_pretrained(tmp_path / "merged")
    run("extract", "--base", folder, "--tuned", str(tmp_path / "merged"), "--rank", "4", "--out", str(tmp_path / "x"))
    output = run("analyze", str(tmp_path / "a"), str(tmp_path / "x"), "--model", folder,
                 "--json", str(tmp_path / "a.json"), "--plots", str(tmp_path / "plots"))
    assert "amplification" in output
    report = json.loads((tmp_path / "a.json").read_text())
    q = next(x for x in report["layers"] if x["module"].endswith("layers.0.self_attn.q_proj"))
    assert q["similarity_A"][3][3] == pytest.approx(1.0, abs=1e-4)  # extracted from a merge of "a": same row space
    assert (tmp_path / "plots" / "spectra.png").is_file()
