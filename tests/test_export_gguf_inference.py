"""llama.cpp itself runs lorakit's GGUF exports: base + adapter logits equal lorakit's unmerged model's.

The files come from the CLI (`lorakit export --format gguf`, `lorakit merge --format gguf`) for a tiny random
Llama whose base GGUF lorakit's writer made. llama.cpp runs through llama-cpp-python, which compiles llama.cpp
from its source distribution, so it is an optional extra (`pip install -e '.[llama]'`), not a test dependency:
without it every test here is skipped. llama.cpp is asked for its float32 KV cache and no flash attention, so
that a float32 file is computed in float32 end to end and the only difference left is summation order.

Tolerances, from the number format of the file (S = the largest |logit|, D = the largest |logit change| the
adapter makes, u = the format's unit roundoff: 2^-11 for f16, 2^-8 for bf16):
- float32 files: F32_TOL * S (float32 rounding in another summation order, a few 1e-7 relative, measured).
- a 16-bit adapter: its A and B are rounded to u, and ggml rounds the activations entering them to the same
  type; both perturb only the adapter's branch, so the error is bounded by 4·u·D (two roundings, each at most u
  of the branch, times two for the growth through the layers after it).
- a 16-bit merged model: every matrix and every activation entering it is rounded, so 4·u·S.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

import lorakit as lk
from lorakit.export import merged_to_gguf
from test_export_gguf import PATTERNS, _tokenizer_gguf
from tiny_models import _llama, randomize_adapters

pytest.importorskip("gguf")
llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install -e '.[llama]' "
                                                    "compiles it; docs/export.md)")
pytestmark = pytest.mark.slow

IDS = [1, 5, 17, 42, 88, 3, 64, 29, 11, 70]
F32_TOL = 1e-5  # relative to the largest |logit|
UNIT_ROUNDOFF = {"fp16": 2.0**-11, "bf16": 2.0**-8}
CASES = {
    "attention": dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "patterns-rslora": PATTERNS,
    "embedding-lm_head": dict(target_modules=["embed_tokens", "k_proj", "lm_head"], rank_pattern={"k_proj": 3}),
}


def _cli(*args: str) -> None:
    from typer.testing import CliRunner

    from lorakit.cli import app

    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output


def _llama_cpp_logits(model: Path, adapter: Path | None = None, scale: float = 1.0) -> np.ndarray:
    """Logits of every position of IDS, computed by llama.cpp in float32 (KV cache too)."""
    lora = {"lora_path": str(adapter), "lora_scale": scale} if adapter else {}
    llm = llama_cpp.Llama(model_path=str(model), n_ctx=64, n_threads=1, logits_all=True, flash_attn=False,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, verbose=False, **lora)
    try:
        llm.eval(IDS)
        return np.array(llm.scores[: len(IDS)], dtype=np.float64)
    finally:
        llm.close()


def _logits(model: torch.nn.Module) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([IDS])).logits[0].double().numpy()


class Exported:
    """A tiny base as GGUF, an adapter on it (folder and lorakit model), and the CLI's GGUF exports of both."""

    def __init__(self, folder: Path, **cfg) -> None:
        torch.manual_seed(0)
        self.folder = folder
        self.base = _llama().eval()
        self.base_gguf = folder / "base.gguf"
        merged_to_gguf(self.base, self.base_gguf, _tokenizer_gguf(folder / "tokenizer.gguf"))
        self.model = lk.inject(copy.deepcopy(self.base), lk.LoraConfig(**{"r": 4, "alpha": 8} | cfg))
        randomize_adapters(self.model)
        lk.save(self.model, folder / "adapter")

    def adapter_gguf(self, dtype: str = "fp32") -> Path:
        out = self.folder / f"adapter-{dtype}.gguf"
        if not out.exists():
            _cli("export", str(self.folder / "adapter"), "--format", "gguf", "--model", str(self.base_gguf),
                 "--out", str(out), "--dtype", dtype)
        return out

    def merged_gguf(self, dtype: str = "fp32") -> Path:
        out = self.folder / f"merged-{dtype}.gguf"
        if not out.exists():
            _cli("merge", "--model", str(self.base_gguf), "--adapter", str(self.folder / "adapter"), "--out", str(out),
                 "--format", "gguf", "--dtype", dtype)
        return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Exported]:
    return {name: Exported(tmp_path_factory.mktemp(name), **cfg) for name, cfg in CASES.items()}


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max())


@pytest.mark.parametrize("case", CASES)
def test_llama_cpp_base_plus_adapter_equals_lorakit_unmerged(case, exported):
    e = exported[case]
    want_base, want = _logits(e.base), _logits(e.model)
    tol = F32_TOL * np.abs(want).max()
    got_base = _llama_cpp_logits(e.base_gguf)
    got = _llama_cpp_logits(e.base_gguf, e.adapter_gguf())
    assert _max_diff(got_base, want_base) <= tol  # the base file alone runs as the torch base
    assert _max_diff(got, want) <= tol, (_max_diff(got, want), tol)
    assert _max_diff(got, got_base) > 1000 * tol  # the adapter changes llama.cpp's output, far beyond the tolerance


@pytest.mark.parametrize("case", CASES)
def test_llama_cpp_merged_gguf_equals_base_plus_adapter_and_lorakit_merged(case, exported):
    e = exported[case]
    want = _logits(lk.unload(copy.deepcopy(e.model), merge=True))
    tol = F32_TOL * np.abs(want).max()
    merged = _llama_cpp_logits(e.merged_gguf())
    assert _max_diff(merged, want) <= tol, (_max_diff(merged, want), tol)
    assert _max_diff(merged, _llama_cpp_logits(e.base_gguf, e.adapter_gguf())) <= tol


def test_llama_cpp_lora_scale_scales_the_update(exported):
    """`--lora-scaled FILE 0.5` (lora_scale here) applies half of lorakit's update."""
    e = exported["attention"]
    half = copy.deepcopy(e.model)
    with torch.no_grad():
        for name, param in half.named_parameters():
            if ".lora_B." in name:
                param.mul_(0.5)
    want = _logits(half)
    got = _llama_cpp_logits(e.base_gguf, e.adapter_gguf(), scale=0.5)
    assert _max_diff(got, want) <= F32_TOL * np.abs(want).max()


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_llama_cpp_16_bit_adapter_within_its_rounding(dtype, exported):
    e = exported["patterns-rslora"]
    want, want_base = _logits(e.model), _logits(e.base)
    change = np.abs(want - want_base).max()
    tol = F32_TOL * np.abs(want).max() + 4 * UNIT_ROUNDOFF[dtype] * change
    got = _llama_cpp_logits(e.base_gguf, e.adapter_gguf(dtype))
    assert _max_diff(got, want) <= tol, (_max_diff(got, want), tol)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_llama_cpp_16_bit_merged_within_its_rounding(dtype, exported):
    e = exported["patterns-rslora"]
    want = _logits(lk.unload(copy.deepcopy(e.model), merge=True))
    tol = 4 * UNIT_ROUNDOFF[dtype] * np.abs(want).max()
    got = _llama_cpp_logits(e.merged_gguf(dtype))
    assert _max_diff(got, want) <= tol, (_max_diff(got, want), tol)
