"""One row per PEFT 0.21 LoraConfig option: the folder PEFT writes either loads into lorakit with PEFT's outputs
(to 1e-5, and back: lorakit's folder loads in PEFT with the same outputs), or is refused with an error naming
the option and the model untouched. docs/formats.md lists the same table."""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch

import lorakit as lk
from lorakit.adapter_files import config_keys
from test_refusals import assert_same, fingerprint
from tiny_models import VOCAB, _gpt2, _ids, _llama

peft = pytest.importorskip("peft")
ATOL = 1e-5


def _seq_cls():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    return LlamaForSequenceClassification(LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                                      num_labels=3, pad_token_id=0))


@dataclass
class Row:
    """PEFT options (`kwargs`), then edits to the written adapter_config.json for options PEFT cannot build on
    a tiny CPU model; `refused` is the text the error must contain (None: loads exactly)."""

    kwargs: dict
    edit: dict = field(default_factory=dict)
    refused: str | None = None
    build: Callable = _llama


Q = dict(target_modules=["q_proj", "v_proj"])
ROWS = {
    "task_type": Row(dict(Q, task_type="SEQ_CLS"), build=_seq_cls),
    "peft_type/auto_mapping/peft_version": Row(Q),  # written into every folder
    "base_model_name_or_path": Row(Q, edit={"base_model_name_or_path": "some-org/some-model"}),
    "revision": Row(dict(Q, revision="main")),
    "inference_mode": Row(dict(Q, inference_mode=True)),
    "r": Row(dict(Q, r=3)),
    "target_modules (regex)": Row(dict(target_modules=r".*\.(q_proj|down_proj)")),
    "target_modules (all-linear)": Row(dict(target_modules="all-linear")),
    "exclude_modules": Row(dict(target_modules="all-linear", exclude_modules=["down_proj", "o_proj"])),
    "lora_alpha": Row(dict(Q, lora_alpha=7)),
    "lora_dropout": Row(dict(Q, lora_dropout=0.1)),
    "fan_in_fan_out": Row(dict(target_modules=["c_attn"], fan_in_fan_out=True), build=_gpt2),
    "bias (all)": Row(dict(target_modules=["c_attn", "c_fc"], bias="all"), build=_gpt2),
    "bias (lora_only)": Row(dict(target_modules=["c_attn"], bias="lora_only"), build=_gpt2),
    "use_rslora": Row(dict(Q, use_rslora=True)),
    "modules_to_save": Row(dict(Q, modules_to_save=["lm_head"])),
    "init_lora_weights (true)": Row(dict(Q, init_lora_weights=True)),
    "init_lora_weights (false)": Row(dict(Q, init_lora_weights=False)),
    "init_lora_weights (gaussian)": Row(dict(Q, init_lora_weights="gaussian")),
    "init_lora_weights (orthogonal)": Row(dict(Q, init_lora_weights="orthogonal")),
    "init_lora_weights (eva)": Row(Q, edit={"init_lora_weights": "eva"}),
    "init_lora_weights (pissa)": Row(dict(Q, init_lora_weights="pissa")),
    "init_lora_weights (pissa_niter_k)": Row(dict(Q, init_lora_weights="pissa_niter_2"), refused="pissa_niter_2"),
    "init_lora_weights (olora)": Row(dict(Q, init_lora_weights="olora"), refused="olora"),
    "init_lora_weights (corda)": Row(Q, edit={"init_lora_weights": "corda"}, refused="corda"),
    "init_lora_weights (loftq)": Row(Q, edit={"init_lora_weights": "loftq"}, refused="loftq"),
    "init_lora_weights (lora_ga)": Row(Q, edit={"init_lora_weights": "lora_ga"}, refused="lora_ga"),
    "init_lora_weights (mica)": Row(Q, edit={"init_lora_weights": "mica"}, refused="mica"),
    "layers_to_transform/layers_pattern": Row(dict(Q, layers_to_transform=[1], layers_pattern="layers")),
    "rank_pattern": Row(dict(Q, rank_pattern={"v_proj": 3})),
    "alpha_pattern": Row(dict(Q, alpha_pattern={r"layers\.1\..*": 5})),
    "megatron_config": Row(Q, edit={"megatron_config": {"tensor_model_parallel_size": 2}},
                           refused="megatron_config"),
    "megatron_core": Row(Q, edit={"megatron_core": "other.core"}),
    "trainable_token_indices": Row(dict(Q, trainable_token_indices=[1, 2]), refused="trainable_token_indices"),
    "loftq_config": Row(Q, edit={"loftq_config": {"loftq_bits": 4, "loftq_iter": 1}}),
    "eva_config": Row(Q, edit={"eva_config": {"rho": 2.0}}),
    "corda_config": Row(Q, edit={"corda_config": {"corda_method": "kpm"}}),
    "lora_ga_config": Row(Q, edit={"lora_ga_config": {"direction": "ArB2r"}}),
    "use_dora": Row(dict(Q, use_dora=True)),
    "velora_config": Row(Q, edit={"velora_config": {"rank": 4}}, refused="velora_config"),
    "alora_invocation_tokens": Row(dict(Q, alora_invocation_tokens=[3, 4]), refused="alora_invocation_tokens"),
    "use_qalora": Row(Q, edit={"use_qalora": True}, refused="use_qalora"),
    "qalora_group_size": Row(Q, edit={"qalora_group_size": 8}),
    "monteclora_config": Row(Q, edit={"monteclora_config": {"n": 2}}, refused="monteclora_config"),
    "layer_replication": Row(dict(Q, layer_replication=[[0, 2], [1, 2]]), refused="layer_replication"),
    "lora_bias": Row(dict(Q, lora_bias=True), refused="lora_bias"),
    "target_parameters": Row(dict(target_modules=[], target_parameters=["attn.c_proj.weight"]), build=_gpt2,
                             refused="target_parameters"),
    "use_bdlora": Row(Q, edit={"use_bdlora": True}, refused="use_bdlora"),
    "arrow_config": Row(Q, edit={"arrow_config": {"top_k": 2}}, refused="arrow_config"),
    "kasa_config": Row(Q, edit={"kasa_config": {"x": 1}}, refused="kasa_config"),
    "ensure_weight_tying": Row(Q, edit={"ensure_weight_tying": True}, refused="ensure_weight_tying"),
    "a key lorakit does not know": Row(Q, edit={"future_option": 1}, refused="future_option"),
}


def _randomize(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad or "lora_" in name:  # inference_mode=True freezes them
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)


def _out(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("name", list(ROWS))
def test_peft_option(name, tmp_path):
    row = ROWS[name]
    torch.manual_seed(0)
    base = row.build().eval()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**({"r": 2, "lora_alpha": 5} | row.kwargs)))
    _randomize(theirs)
    theirs.eval()
    theirs.save_pretrained(tmp_path / "peft")
    config_path = tmp_path / "peft" / "adapter_config.json"
    config_path.write_text(json.dumps(json.loads(config_path.read_text()) | row.edit))
    ours = copy.deepcopy(base)
    if row.refused:
        before = fingerprint(ours)
        with pytest.raises(lk.FormatError, match=row.refused):
            lk.load(ours, tmp_path / "peft")
        assert_same(before, fingerprint(ours))
        return
    ids = _ids(2)
    want = _out(theirs, ids)
    assert not torch.allclose(want, _out(base, ids), atol=1e-3)  # the adapter changes the outputs
    torch.testing.assert_close(_out(lk.load(ours, tmp_path / "peft").eval(), ids), want, atol=ATOL, rtol=0)
    lk.save(ours, tmp_path / "lorakit")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lorakit").eval()
    torch.testing.assert_close(_out(again, ids), want, atol=ATOL, rtol=0)


def test_every_peft_option_is_classified_in_one_place():
    known = set(config_keys.READ) | set(config_keys.HARMLESS) | set(config_keys.DEFAULT_ONLY)
    assert {f.name for f in dataclasses.fields(peft.LoraConfig)} <= known
