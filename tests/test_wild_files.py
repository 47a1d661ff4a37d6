"""Common PEFT 0.21 folders (classification heads, nested modules_to_save, saved embedding layers) load with
PEFT's outputs; lorakit's own folders keep every trained tensor (biases included) under PEFT's names.
The option-by-option table is tests/test_peft_options.py."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

import lorakit as lk
from tiny_models import VOCAB, _gpt2, _ids, _llama, randomize_adapters

peft = pytest.importorskip("peft")
ATOL = 1e-5


def _out(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _randomize_peft(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1 + (1.0 if "magnitude" in name else 0.0))


def _seq_cls_llama():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    return LlamaForSequenceClassification(LlamaConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64,
                                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                                      num_labels=3, pad_token_id=0))


def _tok_cls_gpt2():
    from transformers import GPT2Config, GPT2ForTokenClassification

    return GPT2ForTokenClassification(GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=32,
                                                 num_labels=3, bos_token_id=0, eos_token_id=0))


def _seq_cls_bert():
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(BertConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64,
                                                    num_attention_heads=4, vocab_size=VOCAB, num_labels=3))


def _seq_cls_roberta():
    from transformers import RobertaConfig, RobertaForSequenceClassification

    return RobertaForSequenceClassification(RobertaConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64,
                                                          num_attention_heads=4, vocab_size=VOCAB, num_labels=3))


# common folders lorakit loads exactly: (model, PEFT LoraConfig kwargs)
SUPPORTED = {
    "seq-cls-llama": (_seq_cls_llama, dict(task_type="SEQ_CLS", target_modules=["q_proj", "v_proj"])),
    "tok-cls-gpt2": (_tok_cls_gpt2, dict(task_type="TOKEN_CLS", target_modules=["c_attn"])),
    "seq-cls-bert": (_seq_cls_bert, dict(task_type="SEQ_CLS", target_modules=["query", "value"])),
    "seq-cls-roberta-nested": (_seq_cls_roberta, dict(task_type="SEQ_CLS", target_modules=["query", "value"])),
    "embeddings-saved": (_llama, dict(target_modules=["q_proj", "embed_tokens", "lm_head"])),
}


@pytest.mark.parametrize("row", list(SUPPORTED))
def test_peft_folder_loads_exactly(row, tmp_path):
    build, kwargs = SUPPORTED[row]
    torch.manual_seed(0)
    base = build().eval()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=5, **kwargs))
    _randomize_peft(theirs)
    theirs.eval()
    theirs.save_pretrained(tmp_path, save_embedding_layers="auto")
    ours = lk.load(copy.deepcopy(base), tmp_path).eval()
    ids = _ids(2)
    torch.testing.assert_close(_out(ours, ids), _out(theirs, ids), atol=ATOL, rtol=0)
    # and back: what lorakit writes, PEFT reads to the same outputs
    lk.save(ours, tmp_path / "again")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "again").eval()
    torch.testing.assert_close(_out(again, ids), _out(theirs, ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_trained_biases_are_saved_in_peft_names(bias, tmp_path):
    torch.manual_seed(0)
    base = _gpt2().eval()
    model = lk.inject(copy.deepcopy(base), lk.LoraConfig(r=2, target_modules=["c_attn"], bias=bias))
    randomize_adapters(model)
    trained = [n for n, p in model.named_parameters() if p.requires_grad and "bias" in n]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and "bias" in name:
                p.add_(0.3)
    lk.save(model, tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    bias_keys = sorted(k for k in keys if "lora_" not in k)
    assert len(bias_keys) == len(trained) > 0
    assert "base_model.model.transformer.h.0.attn.c_attn.base_layer.bias" in bias_keys
    ids = _ids(2)
    torch.testing.assert_close(_out(lk.load(copy.deepcopy(base), tmp_path), ids), _out(model, ids), atol=0, rtol=0)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    torch.testing.assert_close(_out(theirs, ids), _out(model, ids), atol=ATOL, rtol=0)
    reference = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["c_attn"], bias=bias))
    assert {k.replace(".default", "") for k in peft.get_peft_model_state_dict(reference)} == keys


def test_nested_modules_to_save_written_by_lorakit_loads(tmp_path):
    torch.manual_seed(0)
    base = _seq_cls_roberta().eval()
    model = lk.inject(copy.deepcopy(base), lk.LoraConfig(r=2, target_modules=["query"], modules_to_save=["classifier"]))
    randomize_adapters(model)
    with torch.no_grad():
        model.classifier.modules_to_save["default"].out_proj.weight.add_(1.0)
    lk.save(model, tmp_path)
    ids = _ids(2)
    torch.testing.assert_close(_out(lk.load(copy.deepcopy(base), tmp_path), ids), _out(model, ids), atol=0, rtol=0)


def test_embedding_rows_mismatch_names_the_fix(tmp_path):
    torch.manual_seed(0)
    grown = _llama()
    grown.resize_token_embeddings(VOCAB + 4)
    theirs = peft.get_peft_model(grown, peft.LoraConfig(r=2, target_modules=["q_proj", "embed_tokens"]))
    theirs.save_pretrained(tmp_path, save_embedding_layers=True)
    with pytest.raises(lk.FormatError, match=r"resize_token_embeddings\(100\)"):
        lk.load(_llama(), tmp_path)
