"""GGUF exports for llama.cpp: LoRA-adapter files and merged models, read back with the gguf package.

llama.cpp's rules for an adapter file (src/llama-adapter.cpp, llama_adapter_lora_init_impl, and
llama_adapter_lora_weight::get_scale), restated here to apply the file without llama.cpp:
general.type must be "adapter", adapter.type "lora", general.architecture the base's; tensors pair up as
`<base tensor>.lora_a` / `.lora_b`; a non-embedding pair needs a.ne[0] == base.ne[0], b.ne[1] == base.ne[1],
a.ne[1] == b.ne[0]; token_embd needs b.ne[1] == base.ne[0] and a.ne[1] == base.ne[1] (lora_a transposed);
each pair is scaled by alpha / b.ne[0]. A merged file is checked by loading it with transformers, whose GGUF
reader undoes llama.cpp's q/k row order on its own.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

import lorakit as lk
from lorakit.errors import LorakitError
from lorakit.export import ExportRefused, merged_to_gguf, to_gguf
from tiny_models import VOCAB, _gpt2, _ids, _llama, randomize_adapters

gguf = pytest.importorskip("gguf")
ATOL = 1e-5
PATTERNS = dict(target_modules="all-linear", rank_pattern={"up_proj": 2, "o_proj": 6},
                alpha_pattern={"o_proj": 3, "down_proj": 1.5}, use_rslora=True)


def _tokenizer_gguf(path: Path) -> Path:
    """A GGUF holding only a tiny tokenizer for the tiny models (the merged writer copies tokenizer.* from it)."""
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_string("general.name", "tiny")
    writer.add_string("tokenizer.ggml.model", "gpt2")
    writer.add_array("tokenizer.ggml.tokens", ["t", "1", "t1"] + [f"x{i}" for i in range(3, VOCAB)])
    writer.add_array("tokenizer.ggml.token_type", [1] * VOCAB)
    writer.add_array("tokenizer.ggml.merges", ["t 1"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _adapted(tmp_path: Path, **cfg):
    torch.manual_seed(0)
    base = _llama().eval()
    model = lk.inject(copy.deepcopy(base), lk.LoraConfig(**{"r": 4, "alpha": 8} | cfg))
    randomize_adapters(model)
    lk.save(model, tmp_path / "adapter")
    return base, model, tmp_path / "adapter"


def _tensors(path: Path) -> dict[str, tuple[np.ndarray, list[int], str]]:
    """name -> (values as float32 in the stored (rows, cols) order, ne, GGML type name)."""
    reader = gguf.GGUFReader(path)
    out = {}
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(list(reversed(t.shape.tolist())))
        out[t.name] = (values.astype(np.float32), t.shape.tolist(), t.tensor_type.name)
    return out


def _field(path: Path, key: str):
    return gguf.GGUFReader(path).fields[key].contents()


def _llamacpp_apply(base: dict, adapter_path: Path) -> dict[str, np.ndarray]:
    """Base tensors with the adapter added as llama.cpp computes it (shape checks and get_scale as in its source)."""
    assert _field(adapter_path, "general.type") == "adapter" and _field(adapter_path, "adapter.type") == "lora"
    alpha = _field(adapter_path, "adapter.lora.alpha")
    tensors = _tensors(adapter_path)
    merged = {name: values.copy() for name, (values, _, _) in base.items()}
    for name in {n.rsplit(".", 1)[0] for n in tensors}:
        (a, a_ne, _), (b, b_ne, _), (_, w_ne, _) = tensors[name + ".lora_a"], tensors[name + ".lora_b"], base[name]
        if name.startswith("token_embd"):
            assert w_ne[0] == b_ne[1] and w_ne[1] == a_ne[1]
            delta = a @ b.T  # (vocab, dim): rows looked up by token, then multiplied by lora_b
        else:
            assert w_ne[0] == a_ne[0] and w_ne[1] == b_ne[1] and a_ne[1] == b_ne[0]
            delta = b @ a
        merged[name] += (alpha / b_ne[0]) * delta
    return merged


# ---- adapter files -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [dict(target_modules=["q_proj", "v_proj"]), PATTERNS,
                                 dict(target_modules=["embed_tokens", "k_proj", "lm_head"],
                                      rank_pattern={"k_proj": 3})],
                         ids=["plain", "patterns-rslora", "embedding-lm_head"])
def test_adapter_gguf_applied_by_llamacpp_rules_equals_lorakit_merge(cfg, tmp_path):
    base, model, folder = _adapted(tmp_path, **cfg)
    tokenizer = _tokenizer_gguf(tmp_path / "tok.gguf")
    result = to_gguf(folder, tmp_path / "adapter.gguf", base=base)
    merged_to_gguf(base, tmp_path / "base.gguf", tokenizer)
    merged_to_gguf(lk.unload(copy.deepcopy(model), merge=True), tmp_path / "merged.gguf", tokenizer)
    applied = _llamacpp_apply(_tensors(tmp_path / "base.gguf"), result.out)
    for name, (want, _, _) in _tensors(tmp_path / "merged.gguf").items():
        np.testing.assert_allclose(applied[name], want, atol=ATOL, rtol=0, err_msg=name)
    assert _field(result.out, "general.architecture") == "llama"


def test_adapter_gguf_names_shapes_and_values(tmp_path):
    base, model, folder = _adapted(tmp_path, target_modules=["q_proj", "k_proj", "embed_tokens"],
                                   rank_pattern={"k_proj": 2})
    result = to_gguf(folder, tmp_path / "adapter.gguf", base=base, dtype=torch.float16)
    tensors = _tensors(result.out)
    assert result.rank == 4 and _field(result.out, "adapter.lora.alpha") == 8.0
    assert set(tensors) == {f"{n}.lora_{x}" for n in ["token_embd.weight", "blk.0.attn_q.weight", "blk.1.attn_q.weight",
                                                       "blk.0.attn_k.weight", "blk.1.attn_k.weight"] for x in "ab"}
    assert tensors["blk.0.attn_q.weight.lora_a"][1] == [32, 4] and tensors["blk.0.attn_q.weight.lora_b"][1] == [4, 32]
    assert tensors["blk.0.attn_k.weight.lora_a"][1] == [32, 2] and tensors["blk.0.attn_k.weight.lora_b"][1] == [2, 16]
    assert tensors["token_embd.weight.lora_a"][1] == [4, VOCAB] and tensors["token_embd.weight.lora_b"][1] == [4, 32]
    assert {kind for _, _, kind in tensors.values()} == {"F16"}
    from lorakit.export.gguf_layout import LlamaLayout

    layout = LlamaLayout(base.config)
    for layer_name, r in [("model.layers.1.self_attn.k_proj", 2), ("model.layers.1.self_attn.q_proj", 4)]:
        layer = model.get_submodule(layer_name)
        A, B = layer.lora_A["default"].detach(), layer.lora_B["default"].detach()
        # stored: scaling·B·r/alpha, so that llama.cpp's alpha/r restores the scaling; plain adapters store B as is
        want = layout.to_gguf_rows(layer_name, B.to(torch.float16).float())
        gguf_name = layout.tensor_name(layer_name)
        np.testing.assert_array_equal(tensors[gguf_name + ".lora_b"][0], want.numpy())
        np.testing.assert_array_equal(tensors[gguf_name + ".lora_a"][0], A.to(torch.float16).float().numpy())
        assert layer.lora_adapters["default"].scaling * r / 8 == 1


def test_adapter_gguf_refusals(tmp_path):
    torch.manual_seed(0)
    tied_base = copy.deepcopy(_llama()).eval()
    tied_base.config.tie_word_embeddings = True
    tied_base.tie_weights()
    model = lk.inject(copy.deepcopy(tied_base), lk.LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"]))
    lk.save(model, tmp_path / "tied")
    with pytest.raises(ExportRefused, match="ties its input embedding"):
        to_gguf(tmp_path / "tied", tmp_path / "x.gguf", base=tied_base)
    _, _, dora = _adapted(tmp_path / "d", use_dora=True)
    with pytest.raises(ExportRefused, match="DoRA"):
        to_gguf(dora, tmp_path / "x.gguf", base=_llama())
    gpt2 = _gpt2().eval()
    lk.save(lk.inject(copy.deepcopy(gpt2), lk.LoraConfig(r=2)), tmp_path / "gpt2")
    with pytest.raises(LorakitError, match="convert_lora_to_gguf"):
        to_gguf(tmp_path / "gpt2", tmp_path / "x.gguf", base=gpt2)
    _, _, plain = _adapted(tmp_path / "p")
    other = _llama()
    other.model.layers[0].self_attn.q_proj = torch.nn.Linear(32, 24, bias=False)
    with pytest.raises(LorakitError, match="another base"):
        to_gguf(plain, tmp_path / "x.gguf", base=other)
    with pytest.raises(LorakitError, match=".gguf"):
        to_gguf(plain, tmp_path / "x.bin", base=_llama())
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*tmp"))


# ---- merged models -----------------------------------------------------------------------------------------
def test_merged_gguf_loads_in_transformers_exactly(tmp_path):
    from transformers import AutoModelForCausalLM

    _, model, _ = _adapted(tmp_path, **PATTERNS)
    merged = lk.unload(model, merge=True)
    merged_to_gguf(merged, tmp_path / "merged.gguf", _tokenizer_gguf(tmp_path / "tok.gguf"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="merged.gguf", dtype=torch.float32).eval()
    ids = _ids(2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, merged(ids).logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_merged_gguf_number_formats(dtype, tmp_path):
    _, model, _ = _adapted(tmp_path, target_modules=["q_proj", "down_proj"])
    merged = lk.unload(model, merge=True)
    out = merged_to_gguf(merged, tmp_path / "m.gguf", _tokenizer_gguf(tmp_path / "tok.gguf"), dtype=dtype)
    tensors = _tensors(out)
    down = merged.model.layers[1].mlp.down_proj.weight.detach()
    np.testing.assert_array_equal(tensors["blk.1.ffn_down.weight"][0], down.to(dtype).float().numpy())
    assert tensors["blk.1.ffn_down.weight"][2] == {torch.float16: "F16", torch.bfloat16: "BF16"}[dtype]
    assert tensors["output_norm.weight"][2] == "F32"
    assert _field(out, "general.file_type") == {torch.float16: 1, torch.bfloat16: 32}[dtype]
    assert _field(out, "tokenizer.ggml.tokens")[:4] == ["t", "1", "t1", "x3"]


# ---- the embedded default ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_merge_default_to_gguf_matches_its_source_layout(tmp_path):
    """`lorakit merge --format gguf` of the embedded default: the source GGUF's tensor names, shapes and
    llama.* keys, the tokenizer copied, and values equal to lorakit's merged weights."""
    from typer.testing import CliRunner

    from lorakit.assets import default_model_path
    from lorakit.cli import app
    from lorakit.models import load_base_model

    base, _ = load_base_model("default")
    model = lk.inject(base, lk.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(model, std=0.02)
    lk.save(model, tmp_path / "adapter")
    out = tmp_path / "merged.gguf"
    result = CliRunner().invoke(app, ["merge", "--adapter", str(tmp_path / "adapter"), "--out", str(out),
                                      "--format", "gguf", "--dtype", "fp32"])
    assert result.exit_code == 0, result.output
    source, written = gguf.GGUFReader(default_model_path()), gguf.GGUFReader(out)
    assert {t.name: t.shape.tolist() for t in written.tensors} == {t.name: t.shape.tolist() for t in source.tensors}
    for key, field in source.fields.items():
        if key.startswith(("llama.", "tokenizer.")):
            assert written.fields[key].contents() == field.contents(), key
    merged = lk.unload(model, merge=True)
    q = {t.name: t for t in written.tensors}["blk.3.attn_q.weight"]
    from lorakit.export.gguf_layout import LlamaLayout

    q_proj = merged.model.layers[3].self_attn.q_proj.weight.detach()
    want = LlamaLayout(merged.config).to_gguf_rows("model.layers.3.self_attn.q_proj.weight", q_proj)
    np.testing.assert_array_equal(q.data.reshape(576, 576), want.numpy())


def test_adapter_gguf_from_a_model_equals_from_its_folder(tmp_path):
    base, model, folder = _adapted(tmp_path, target_modules=["embed_tokens", "v_proj"], rank_pattern={"v_proj": 2})
    from_model = _tensors(to_gguf(model, tmp_path / "a.gguf").out)
    from_folder = _tensors(to_gguf(folder, tmp_path / "b.gguf", base=base).out)
    assert from_model.keys() == from_folder.keys()
    for name, (values, ne, _) in from_model.items():
        np.testing.assert_array_equal(values, from_folder[name][0])
        assert ne == from_folder[name][1]
    assert _field(tmp_path / "a.gguf", "general.name") == "default"
    assert _field(tmp_path / "b.gguf", "general.name") == "adapter"
