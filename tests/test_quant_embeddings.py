"""Quantized embeddings and output head: bytes against bitsandbytes, outputs and gradients against the
dequantize-then-dense model, tied pairs staying tied, and exact state-dict round trips."""

from __future__ import annotations

import copy

import bitsandbytes.functional as BF
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit as lk
from lorakit.errors import FormatError, LorakitError
from lorakit.quant import QuantEmbedding, QuantHead, embedding
from lorakit.train.job import JobConfig

VOCAB = 300
TYPES = ["int8", "nf4", "fp4"]


def _llama(tied: bool, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, tie_word_embeddings=tied)
    return LlamaForCausalLM(config)


def _quantized(tied: bool, table: str, seed: int = 0) -> LlamaForCausalLM:
    return lk.quantize_model(_llama(tied, seed), "nf4", compute_dtype=torch.float32, embeddings=table)


def _ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (3, 9), generator=torch.Generator().manual_seed(1))


def test_int8_rows_are_bitsandbytes_vectorwise_bytes():
    w = torch.randn(37, 50) * 0.05
    w[3] = 0.0  # an all-zero row: codes 0, absmax 0 (bitsandbytes would divide by zero)
    codes, absmax = embedding.quantize_rows_int8(w)
    ref_codes, ref_absmax, _ = BF.int8_vectorwise_quant(w)
    nonzero = absmax > 0
    assert torch.equal(codes[nonzero], ref_codes[nonzero]) and torch.equal(absmax, ref_absmax)
    assert not codes[3].any()
    table = embedding.QuantTable(37, 50, "int8", torch.float32)
    table.quantize_from(w)
    assert torch.equal(table.dequantize_weight()[nonzero], BF.int8_vectorwise_dequant(ref_codes, ref_absmax)[nonzero])


def test_nf4_table_is_bitsandbytes_4bit_bytes():
    w = torch.randn(40, 128) * 0.05
    table = embedding.QuantTable(40, 128, "nf4", torch.float32)
    table.quantize_from(w)
    packed, state = BF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    assert torch.equal(table.weight.view(-1), packed.view(-1)) and torch.equal(table.absmax, state.absmax)
    assert torch.equal(table.dequantize_weight(), BF.dequantize_4bit(packed, state))


@pytest.mark.parametrize("table", TYPES)
def test_lookup_decodes_exactly_the_rows_of_the_dense_table(table):
    dense = torch.nn.Embedding(VOCAB, 64)
    quantized = QuantEmbedding.from_embedding(dense, table)
    ids = _ids()
    assert torch.equal(quantized(ids), torch.nn.functional.embedding(ids, quantized.dequantize_weight()))
    rows = quantized.decode_rows(17, 40, torch.bfloat16)
    assert torch.equal(rows, quantized.dequantize_weight(torch.bfloat16)[17:40])


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("table", TYPES)
def test_logits_equal_the_dequantized_dense_model(tied, table, monkeypatch):
    monkeypatch.setattr(embedding, "TILE_ELEMENTS", 64 * 70)  # five tiles, the last one short
    model = _quantized(tied, table)
    assert isinstance(model.get_input_embeddings(), QuantEmbedding)
    assert isinstance(model.get_output_embeddings(), QuantHead)
    assert (model.lm_head.table is model.model.embed_tokens) == tied
    dense = lk.dequantize_model(copy.deepcopy(model))
    assert (dense.lm_head.weight is dense.model.embed_tokens.weight) == tied
    torch.testing.assert_close(model(_ids()).logits, dense(_ids()).logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("table", ["int8", "nf4"])
def test_lora_gradients_flow_through_the_quantized_head(tied, table, monkeypatch):
    monkeypatch.setattr(embedding, "TILE_ELEMENTS", 64 * 128)
    models = []
    for dense in (False, True):
        model = _quantized(tied, table)
        if dense:
            lk.dequantize_model(model)
        torch.manual_seed(5)
        lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(std=0.1)
        ids = _ids()
        model(input_ids=ids, labels=ids).loss.backward()
        models.append(model)
    grads = [{n: p.grad for n, p in m.named_parameters() if p.requires_grad} for m in models]
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 8
    for name, grad in grads[0].items():
        assert grad is not None and grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, grads[1][name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("table", TYPES)
def test_state_dict_round_trip_is_exact(tied, table, tmp_path):
    model = _quantized(tied, table)
    state = model.state_dict()
    assert not any(k.startswith("lm_head.") for k in state) if tied else "lm_head.weight" in state
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "model.safetensors")
    fresh = _quantized(tied, table, seed=7)  # other weights: everything must come from the file
    fresh.load_state_dict(load_file(tmp_path / "model.safetensors"), strict=True)
    again = fresh.state_dict()
    assert again.keys() == state.keys()
    assert all(torch.equal(again[k], state[k]) for k in state)
    assert torch.equal(fresh(_ids()).logits, model(_ids()).logits)


def test_a_table_of_another_type_is_refused_and_the_model_kept():
    source, target = _quantized(True, "int8"), _quantized(True, "nf4", seed=3)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(FormatError, match="bitsandbytes__"):
        target.load_state_dict(source.state_dict())
    int8_target = _quantized(True, "int8", seed=3)
    with pytest.raises(FormatError, match="int8"):
        int8_target.load_state_dict(_quantized(True, "nf4").state_dict(), strict=False)
    assert all(torch.equal(target.state_dict()[k], v) for k, v in before.items())


def test_casting_the_model_keeps_statistics_float32():
    model = _quantized(False, "int8").to(torch.bfloat16)
    assert model.model.embed_tokens.SCB.dtype == torch.float32 and model.lm_head.SCB.dtype == torch.float32
    assert model.model.embed_tokens(_ids()).dtype == torch.float32  # the dtype the table was quantized from


def test_report_counts_a_tied_table_once():
    report = lk.quantization_report(_quantized(True, "nf4"))
    untied = lk.quantization_report(_quantized(False, "nf4"))
    assert (report.tables, untied.tables) == (1, 2)
    assert untied.quantized_bytes - report.quantized_bytes == untied.model_bytes - report.model_bytes > 0
    dense = _llama(True)
    assert report.model_bytes_before == sum(t.numel() * 4 for t in [*dense.parameters(), *dense.buffers()])


def test_bad_settings_name_the_fix():
    with pytest.raises(LorakitError, match="embeddings must be one of"):
        _quantized(True, "int4")
    with pytest.raises(LorakitError, match="blocksize dividing 64"):
        lk.quantize_model(_llama(True), "nf4", blocksize=128, embeddings="nf4")
    with pytest.raises(LorakitError, match="add --quantize nf4"):
        JobConfig(quantize_embeddings="int8")
    with pytest.raises(LorakitError, match="already"):
        embedding.quantize_embeddings(_quantized(True, "int8"), "int8")


def test_a_hugging_face_folder_is_refused_rather_than_written_unloadable(tmp_path):
    from lorakit.quant.hf_folder import save_quantized

    with pytest.raises(FormatError, match="state_dict"):
        save_quantized(_quantized(True, "int8"), None, tmp_path)
    assert not any(tmp_path.iterdir())


def test_gradient_checkpointing_gives_the_same_lora_gradients():
    grads = []
    for checkpointing in (False, True):
        model = _quantized(True, "nf4")
        torch.manual_seed(5)
        lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        ids = _ids()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7)


def test_cli_train_takes_quantize_embeddings_only_with_quantize():
    from typer.testing import CliRunner

    from lorakit.cli import app

    result = CliRunner().invoke(app, ["train", "--quantize-embeddings", "int8", "--dry-run"])
    assert result.exit_code != 0 and isinstance(result.exception, LorakitError)
    assert "add --quantize nf4" in str(result.exception)


@pytest.mark.parametrize("tied", [True, False])
def test_count_parameters_counts_quantized_weights_as_the_dense_ones(tied):
    """A QLoRA model reports the same total (and trainable share) as the same model unquantized."""
    config = lk.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    dense = lk.inject(_llama(tied), config)
    quantized = lk.inject(_quantized(tied, "nf4"), config)
    assert lk.count_parameters(quantized) == lk.count_parameters(dense)
    trainable, total = lk.count_parameters(dense)
    assert 0 < trainable < total
