"""`lorakit export --format vllm`: exported folders checked with a replica of vLLM's loading rules against PEFT.

vLLM itself needs a GPU build, so the replica below restates, in a few lines of our own, what vLLM's LoRA
loader does with a folder (read from its source, functions named at each step):
- `PEFTHelper.from_dict` (vllm/lora/peft_helper.py): needs r, lora_alpha, target_modules; keeps only its own
  fields, so rank_pattern / alpha_pattern are dropped without a word.
- `PEFTHelper._validate_features` / `validate_legal`: refuses modules_to_save, use_dora, bias != "none"
  (without bias_enabled), and r > max_lora_rank.
- `PEFTHelper.__post_init__`: one scaling for the adapter, lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora.
- `LoRAModel.from_local_checkpoint` (vllm/lora/lora_model.py): reads adapter_model.safetensors (or .bin) of
  that folder only; `check_unexpected_modules` refuses a module whose last name part the model cannot adapt.
- `parse_fine_tuned_lora_name` (vllm/lora/utils.py): `<module>.lora_A.weight` / `.lora_B.weight` and
  `<module>.lora_embedding_A` / `_B` after the `base_model.model.` prefix; anything else is an error.
- `LoRAModel.from_lora_tensors`: a lora_embedding_A must have the base's vocabulary as its second dimension.
- `LoRALayerWeights.optimize` (vllm/lora/lora_weights.py): lora_b *= scaling; the layers then add
  x·Aᵀ·Bᵀ (linear and lm_head, LogitsProcessorWithLoRA) or Aᵀ[ids]·Bᵀ (VocabParallelEmbeddingWithLoRA),
  each pair copied into rank-max_lora_rank buffers by its own shape.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import lorakit as lk
from lorakit.errors import LorakitError
from lorakit.export import ExportRefused, to_vllm
from tiny_models import VOCAB, _ids, _llama, randomize_adapters

peft = pytest.importorskip("peft")
ATOL = 1e-5


# ---- the replica of vLLM's rules ------------------------------------------------------------------------
class VllmRefused(ValueError):
    pass


def vllm_read(folder: Path, model: nn.Module, max_lora_rank: int = 16) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module -> (A, B with the scaling multiplied in), as vLLM's loader would hold them, or VllmRefused."""
    config = json.loads((folder / "adapter_config.json").read_text())
    missing = {"r", "lora_alpha", "target_modules"} - set(config)  # PEFTHelper.from_dict
    if missing:
        raise VllmRefused(f"Missing required configuration fields: {missing}")
    problems = []
    if config.get("modules_to_save"):  # PEFTHelper._validate_features
        problems.append("modules_to_save")
    if config.get("use_dora"):
        problems.append("DoRA")
    if config["r"] > max_lora_rank:  # PEFTHelper.validate_legal
        problems.append("rank above max_lora_rank")
    if config.get("bias", "none") != "none":
        problems.append("bias")
    if problems:
        raise VllmRefused(", ".join(problems))
    r, alpha = config["r"], config["lora_alpha"]  # PEFTHelper.__post_init__; patterns are never read
    scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    tensors = load_file(folder / "adapter_model.safetensors")  # LoRAModel.from_local_checkpoint
    adaptable = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))}
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        module, kind = _parse_name(key)  # parse_fine_tuned_lora_name
        if module.rsplit(".", 1)[-1] not in adaptable:  # check_unexpected_modules
            raise VllmRefused(f"unexpected module {module}")
        if key.endswith("lora_embedding_A") and tensor.shape[1] != VOCAB:  # from_lora_tensors
            raise VllmRefused("embedding LoRA size must match the vocabulary")
        pairs.setdefault(module, {})[kind] = tensor.float()
    out = {}
    for module, pair in pairs.items():
        A, B = pair["A"], pair["B"]
        if A.shape[0] > max_lora_rank or B.shape[1] > max_lora_rank:  # set_lora copies into rank buffers
            raise VllmRefused(f"{module}: tensor rank above max_lora_rank")
        out[module] = (A, B * scaling)  # LoRALayerWeights.optimize
    return out


def _parse_name(key: str) -> tuple[str, str]:
    name = key.removeprefix("base_model.model.")
    parts = name.split(".")
    if parts[-1] == "weight" and parts[-2] in ("lora_A", "lora_B"):
        return ".".join(parts[:-2]), parts[-2][-1]
    if parts[-1] in ("lora_embedding_A", "lora_embedding_B"):
        return ".".join(parts[:-1]), parts[-1][-1]
    raise VllmRefused(f"{key} is unsupported LoRA weight")


def vllm_apply(base: nn.Module, loras: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> nn.Module:
    """A copy of `base` whose adapted layers add the LoRA output beside the base output, as vLLM's layers do."""
    model = copy.deepcopy(base)
    for module_name, (A, B) in loras.items():
        layer = model.get_submodule(module_name)
        if isinstance(layer, nn.Embedding):
            layer.register_forward_hook(lambda m, args, out, A=A, B=B: out + F.embedding(args[0], A.T) @ B.T)
        else:
            layer.register_forward_hook(lambda m, args, out, A=A, B=B: out + (args[0] @ A.T) @ B.T)
    return model


# ---- helpers ------------------------------------------------------------------------------------------------
def _saved(tmp_path: Path, dtype: torch.dtype | None = None, **cfg) -> tuple[nn.Module, Path]:
    torch.manual_seed(0)
    base = _llama().eval()
    model = lk.inject(copy.deepcopy(base), lk.LoraConfig(**{"r": 4, "alpha": 8} | cfg))
    randomize_adapters(model)
    folder = tmp_path / "adapter"
    lk.save(model, folder, dtype=dtype)
    return base, folder


def _peft_logits(base: nn.Module, folder: Path, ids: torch.Tensor) -> torch.Tensor:
    model = peft.PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()
    with torch.no_grad():
        return model(ids).logits


def _vllm_logits(base: nn.Module, folder: Path, ids: torch.Tensor, max_lora_rank: int = 16) -> torch.Tensor:
    with torch.no_grad():
        return vllm_apply(base, vllm_read(folder, base, max_lora_rank))(ids).logits


# ---- the export is exact -----------------------------------------------------------------------------------
EXACT_CASES = {
    "plain": dict(target_modules=["q_proj", "v_proj"]),
    "patterns": dict(target_modules="all-linear", rank_pattern={"up_proj": 2, "o_proj": 6},
                     alpha_pattern={"o_proj": 3, "down_proj": 1.5}),
    "rslora-patterns": dict(target_modules="all-linear", use_rslora=True, rank_pattern={"gate_proj": 8},
                            alpha_pattern={"k_proj": 2}),
    "embedding-lm_head": dict(target_modules=["embed_tokens", "q_proj", "lm_head"], rank_pattern={"lm_head": 2}),
}


@pytest.mark.parametrize("cfg", EXACT_CASES.values(), ids=EXACT_CASES.keys())
def test_exported_folder_applies_in_vllm_as_peft(cfg, tmp_path):
    base, folder = _saved(tmp_path, **cfg)
    result = to_vllm(folder, tmp_path / "vllm")
    ids = _ids(2)
    torch.testing.assert_close(_vllm_logits(base, result.out, ids), _peft_logits(base, folder, ids), atol=ATOL, rtol=0)
    config = json.loads((result.out / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == result.rank and not config["use_rslora"]
    assert config["rank_pattern"] == {} == config["alpha_pattern"]
    written = load_file(result.out / "adapter_model.safetensors")
    assert {t.shape[0] for k, t in written.items() if "_A" in k} == {result.rank}
    # the exported folder still loads in PEFT and lorakit with the same outputs
    reference = _peft_logits(base, folder, ids)
    torch.testing.assert_close(_peft_logits(base, result.out, ids), reference, atol=ATOL, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(lk.load(copy.deepcopy(base), result.out)(ids).logits, reference, atol=ATOL, rtol=0)


def test_patterns_are_wrong_in_vllm_without_the_export(tmp_path):
    """The reason for the export: vLLM drops rank_pattern / alpha_pattern and scales every module by lora_alpha / r."""
    base, folder = _saved(tmp_path, **EXACT_CASES["patterns"])
    ids = _ids(2)
    error = (_vllm_logits(base, folder, ids) - _peft_logits(base, folder, ids)).abs().max()
    assert error > 1e-3


@pytest.mark.parametrize("cfg", [EXACT_CASES["plain"], dict(target_modules="all-linear", use_rslora=True),
                                 dict(target_modules=["embed_tokens", "lm_head"])],
                         ids=["plain", "rslora", "embedding"])
def test_folders_without_patterns_already_apply_in_vllm(cfg, tmp_path):
    base, folder = _saved(tmp_path, **cfg)
    ids = _ids(2)
    torch.testing.assert_close(_vllm_logits(base, folder, ids), _peft_logits(base, folder, ids), atol=ATOL, rtol=0)


def test_padding_and_folded_scaling_reported(tmp_path):
    _, folder = _saved(tmp_path, **EXACT_CASES["patterns"])
    result = to_vllm(folder, tmp_path / "vllm")
    assert result.rank == 6 and result.max_lora_rank == 8 and result.vllm_flags == "--enable-lora --max-lora-rank 8"
    assert all(m.endswith(("q_proj", "k_proj", "v_proj", "up_proj", "gate_proj", "down_proj")) for m in result.padded)
    assert result.folded["model.layers.0.self_attn.o_proj"] == pytest.approx(3 / 6)
    assert result.folded["model.layers.1.mlp.down_proj"] == pytest.approx(1.5 / 4)
    assert result.folded["model.layers.1.mlp.up_proj"] == pytest.approx(8 / 2)


def test_rank_above_16_needs_the_printed_flag(tmp_path):
    base, folder = _saved(tmp_path, r=20, alpha=10, target_modules=["v_proj"])
    result = to_vllm(folder, tmp_path / "vllm")
    assert result.max_lora_rank == 32
    with pytest.raises(VllmRefused, match="max_lora_rank"):
        vllm_read(result.out, base, max_lora_rank=16)
    ids = _ids(1)
    torch.testing.assert_close(_vllm_logits(base, result.out, ids, max_lora_rank=32), _peft_logits(base, folder, ids),
                               atol=ATOL, rtol=0)


def test_bf16_source_keeps_its_dtype_or_exports_exact_fp32(tmp_path):
    base, folder = _saved(tmp_path, dtype=torch.bfloat16, **EXACT_CASES["patterns"])
    kept = to_vllm(folder, tmp_path / "bf16")
    assert {t.dtype for t in load_file(kept.out / "adapter_model.safetensors").values()} == {torch.bfloat16}
    exact = to_vllm(folder, tmp_path / "fp32", dtype=torch.float32)
    ids = _ids(2)
    reference = _peft_logits(base, folder, ids)
    torch.testing.assert_close(_vllm_logits(base, exact.out, ids), reference, atol=ATOL, rtol=0)
    # bf16 keeps 8 significant bits: folding the scaling in adds one more rounding of B, nothing else
    assert (_vllm_logits(base, kept.out, ids) - reference).abs().max() < 2e-2


def test_model_and_folder_give_the_same_export(tmp_path):
    torch.manual_seed(0)
    model = lk.inject(_llama().eval(), lk.LoraConfig(r=4, alpha=8, rank_pattern={"v_proj": 2}))
    randomize_adapters(model)
    lk.save(model, tmp_path / "adapter")
    from_model = to_vllm(model, tmp_path / "a")
    from_folder = to_vllm(tmp_path / "adapter", tmp_path / "b")
    a, b = (load_file(r.out / "adapter_model.safetensors") for r in (from_model, from_folder))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- refusals ----------------------------------------------------------------------------------------------
REFUSED = {
    "dora": (dict(use_dora=True), "DoRA"),
    "bias": (dict(bias="all"), "trained biases"),
    "modules_to_save": (dict(modules_to_save=["model.norm"]), "modules_to_save"),
}


@pytest.mark.parametrize("name", REFUSED)
def test_refusals_name_the_reason_and_suggest_merge(name, tmp_path):
    cfg, reason = REFUSED[name]
    base, folder = _saved(tmp_path, **cfg)
    with pytest.raises(ExportRefused, match=reason) as err:
        to_vllm(folder, tmp_path / "vllm")
    assert "lorakit merge" in str(err.value)
    assert not (tmp_path / "vllm").exists()
    with pytest.raises(VllmRefused):  # vLLM refuses the source folder too
        vllm_read(folder, base)


def test_raw_pissa_is_refused_but_converted_pissa_exports(tmp_path):
    torch.manual_seed(0)
    base = _llama().eval()
    model = lk.inject(copy.deepcopy(base), lk.LoraConfig(r=2, alpha=4, init="pissa", target_modules=["q_proj"]))
    randomize_adapters(model)
    lk.save(model, tmp_path / "raw", convert_pissa=False)
    with pytest.raises(ExportRefused, match="pissa"):
        to_vllm(tmp_path / "raw", tmp_path / "vllm")
    lk.save(model, tmp_path / "converted")
    result = to_vllm(tmp_path / "converted", tmp_path / "vllm")
    ids = _ids(2)
    torch.testing.assert_close(_vllm_logits(base, result.out, ids), _peft_logits(base, tmp_path / "converted", ids),
                               atol=ATOL, rtol=0)


def test_subfolder_adapters_are_listed_not_merged(tmp_path):
    torch.manual_seed(0)
    model = lk.inject(_llama().eval(), lk.LoraConfig(r=2, target_modules=["q_proj"]))
    lk.add_adapter(model, "sql", lk.LoraConfig(r=2, target_modules=["v_proj"]))
    lk.save(model, tmp_path / "all", adapter=None)
    result = to_vllm(tmp_path / "all", tmp_path / "vllm")
    assert result.other_adapters == ["sql"]
    assert all("q_proj" in m for m in result.folded)


def test_peft_folders_with_lora_bias_or_patterns(tmp_path):
    """PEFT's own folders: lora_bias (a trained lora_B bias) is refused by name; rank/alpha patterns export exactly."""
    torch.manual_seed(0)
    base = _llama().eval()
    biased = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["q_proj"], lora_bias=True))
    biased.save_pretrained(tmp_path / "biased")
    with pytest.raises(LorakitError, match="lora_bias") as err:  # refused when the folder is read
        to_vllm(tmp_path / "biased", tmp_path / "x")
    assert "modules_to_save" not in str(err.value)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                             rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 3}, init_lora_weights=False)
    patterned = peft.get_peft_model(copy.deepcopy(base), config)
    patterned.save_pretrained(tmp_path / "patterned")
    result = to_vllm(tmp_path / "patterned", tmp_path / "vllm")
    ids = _ids(2)
    torch.testing.assert_close(_vllm_logits(base, result.out, ids), _peft_logits(base, tmp_path / "patterned", ids),
                               atol=ATOL, rtol=0)
