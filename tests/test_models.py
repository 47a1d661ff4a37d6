"""Base-model loading (default, GGUF, HF folder, single safetensors file) and saving plain HF folders."""

import json
import socket
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from lorakit.assets import default_model_path
from lorakit.errors import FormatError, LorakitError
from lorakit.models import load_base_model, save_hf_folder

PROMPT = "Review: A gorgeous, witty film.\nSentiment:"


def _no_network(*args, **kwargs):
    raise AssertionError("lorakit tried to open a network connection")


@pytest.fixture(scope="module")
def offline():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", _no_network)
        yield


@pytest.fixture(scope="module")
def default(offline):
    try:
        default_model_path()
    except LorakitError as err:
        pytest.skip(str(err))
    return load_base_model("default")


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


IDS = torch.tensor([[1, 5, 17, 42, 3, 88, 9]])


# ---- the embedded default -------------------------------------------------------------------------------


def test_default_is_smollm2_135m(default):
    model, tokenizer = default
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.dtype == torch.float32 and not model.training
    assert getattr(model, "hf_quantizer", None) is None
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template


def test_default_tokenizer_round_trip(default):
    _, tokenizer = default
    text = "Café «naïve» review – isn't it 10/10?\nSentiment:"
    assert tokenizer.decode(tokenizer(text).input_ids) == text
    for answer in (" positive", " negative"):
        assert len(tokenizer(answer, add_special_tokens=False).input_ids) == 1


def test_default_forward(default):
    model, tokenizer = default
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    logits = _logits(model, ids)
    assert logits.shape == (1, ids.shape[1], 49_152) and torch.isfinite(logits).all()


def test_gguf_path_matches_default(default):
    model, tokenizer = default
    gguf_model, gguf_tokenizer = load_base_model(default_model_path())
    assert type(gguf_model).__name__ == "LlamaForCausalLM"
    assert getattr(gguf_model, "hf_quantizer", None) is None  # dense layers, so LoRA and saving work
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    assert torch.equal(gguf_tokenizer(PROMPT, return_tensors="pt").input_ids, ids)
    torch.testing.assert_close(_logits(gguf_model, ids), _logits(model, ids), rtol=0, atol=0)


# ---- Hugging Face folders and safetensors files ----------------------------------------------------------


def test_hf_folder_round_trip(tiny, tmp_path, offline):
    out = save_hf_folder(tiny, None, tmp_path / "tiny")
    model, tokenizer = load_base_model(out)
    assert tokenizer is None and type(model) is LlamaForCausalLM
    assert torch.equal(_logits(model, IDS), _logits(tiny, IDS))
    plain = AutoModelForCausalLM.from_pretrained(out)  # what transformers alone makes of the folder
    assert torch.equal(_logits(plain, IDS), _logits(tiny, IDS))


def test_save_with_dtype_leaves_model_alone(tiny, tmp_path, offline):
    out = save_hf_folder(tiny, None, tmp_path / "bf16", dtype=torch.bfloat16)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert tiny.dtype == torch.float32
    model, _ = load_base_model(out, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, tiny.model.layers[0].mlp.up_proj.weight.bfloat16())
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_save_with_tokenizer_and_overwrite(default, tiny, tmp_path):
    _, tokenizer = default
    out = tmp_path / "with_tok"
    save_hf_folder(tiny, tokenizer, out)
    with torch.no_grad():
        tiny.model.norm.weight.mul_(2)
    save_hf_folder(tiny, tokenizer, out)  # into an existing folder: files are replaced one by one
    model, loaded_tokenizer = load_base_model(out)
    assert torch.equal(_logits(model, IDS), _logits(tiny, IDS))
    assert loaded_tokenizer(PROMPT).input_ids == tokenizer(PROMPT).input_ids
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_sequence_classification_task(tiny, tmp_path, offline):
    out = save_hf_folder(tiny, None, tmp_path / "tiny")
    model, _ = load_base_model(out, task="sequence-classification", num_labels=3)
    assert type(model).__name__ == "LlamaForSequenceClassification" and model.score.out_features == 3
    with pytest.raises(LorakitError, match="sequence-classification"):
        load_base_model(out, task="translation")


def test_single_safetensors_file_with_config(tiny, tmp_path, offline):
    folder = save_hf_folder(tiny, None, tmp_path / "loose")
    weights = (folder / "model.safetensors").rename(folder / "step-100.safetensors")
    model, _ = load_base_model(weights)
    assert torch.equal(_logits(model, IDS), _logits(tiny, IDS))
    assert model.lm_head.weight is model.model.embed_tokens.weight and not model.training
    with pytest.raises(LorakitError, match=r"step-100\.safetensors"):  # the folder alone has no known weights
        load_base_model(folder)


def test_safetensors_file_errors(tiny, tmp_path):
    from safetensors.torch import save_file

    alone = tmp_path / "alone"
    alone.mkdir()
    save_file({"w": torch.zeros(2)}, alone / "w.safetensors")
    with pytest.raises(LorakitError, match="config.json"):
        load_base_model(alone / "w.safetensors")

    folder = save_hf_folder(tiny, None, tmp_path / "f")
    state = {f"base_model.model.{k}": v for k, v in tiny.state_dict().items()}
    save_file({k: v.contiguous().clone() for k, v in state.items()}, folder / "prefixed.safetensors")
    with pytest.raises(FormatError, match="missing keys"):
        load_base_model(folder / "prefixed.safetensors")

    save_file({"model.norm.weight": torch.ones(7)}, folder / "shape.safetensors")
    with pytest.raises(FormatError, match=r"model.norm.weight \(7,\) vs \(32,\)"):
        load_base_model(folder / "shape.safetensors")

    (folder / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(FormatError, match="broken.safetensors"):
        load_base_model(folder / "broken.safetensors")


def test_bad_paths_name_what_was_found(tmp_path):
    with pytest.raises(LorakitError, match="No model at .*nowhere.*expected 'default'"):
        load_base_model(tmp_path / "nowhere")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(LorakitError, match=r"found \['notes.txt'\].*config.json"):
        load_base_model(tmp_path)
    with pytest.raises(LorakitError, match="notes.txt"):
        load_base_model(tmp_path / "notes.txt")


def test_save_refuses_what_transformers_cannot_load(tiny, tmp_path):
    with pytest.raises(LorakitError, match="PreTrainedModel"):
        save_hf_folder(torch.nn.Linear(2, 2), None, tmp_path / "x")
    tiny.model.layers[0].self_attn.q_proj.lora_A = torch.nn.ParameterDict({"default": torch.zeros(2, 32)})
    with pytest.raises(LorakitError, match="unload"):
        save_hf_folder(tiny, None, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_import_is_cheap():
    code = "import sys, lorakit.models; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
