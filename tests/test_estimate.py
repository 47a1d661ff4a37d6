"""The memory estimate against a real tiny Llama: exact parameter counts, the rows that follow from them,
activation bytes close to what a real training forward saves for backward, and an evaluation forward's
peak close to what the allocator really holds."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit as lk
from lorakit.quant import quantize_model
from lorakit.train.data import collate
from lorakit.train.estimate import EVAL_BATCH, MemoryEstimate, estimate
from lorakit.train.estimate_table import estimate_table
from lorakit.train.evaluate import left_pad
from lorakit.train.objectives import causal_lm_loss, tail_logits
from lorakit.train.saved_activations import lean_saved_activations

BATCH, SEQ, LOSS_TOKENS = 4, 24, 2
CONFIG = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
          "num_key_value_heads": 2, "vocab_size": 128, "max_position_embeddings": 64, "tie_word_embeddings": True}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaConfig(**CONFIG).save_pretrained(path)  # config.json only: the estimate never reads weights
    return path


def _real_model(method: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG))
    if method == "full":
        return model
    if method == "qlora":
        quantize_model(model, "nf4", compute_dtype=torch.float32)
    return lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))


def _batch() -> dict[str, torch.Tensor]:
    """Left-padded rows of different lengths, the longest SEQ, each with its last LOSS_TOKENS labelled."""
    rows = []
    for n in (SEQ, SEQ - 5, SEQ - 9, SEQ - 3):
        ids = [(7 * i + n) % CONFIG["vocab_size"] for i in range(n)]
        rows.append({"input_ids": ids, "labels": [-100] * (n - LOSS_TOKENS) + ids[-LOSS_TOKENS:]})
    return collate(rows, pad_id=0, padding_side="left")


def _saved_bytes(model: torch.nn.Module, dtype: torch.dtype | None) -> int:
    """Bytes of the distinct non-weight tensors a real training forward keeps for backward, as the trainer
    runs it (without activation outputs)."""
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def record(tensor: torch.Tensor) -> None:
        ptr = tensor.untyped_storage().data_ptr()
        if ptr not in weights:
            saved[ptr] = tensor.untyped_storage().nbytes()

    model.train()
    with lean_saved_activations(observe=record), \
            torch.autocast("cpu", dtype or torch.float32, enabled=dtype is not None):
        loss, _ = causal_lm_loss(model, _batch())
    loss.backward()  # the graph was complete and usable
    return sum(saved.values())


def _estimate(folder, method: str, precision: str = "fp32") -> MemoryEstimate:
    return estimate(folder, method, r=4, target=["q_proj", "v_proj"], batch_size=BATCH, seq_len=SEQ,
                    precision=precision, loss_tokens=LOSS_TOKENS)


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_counts_match_a_real_model(folder, method):
    trainable, _ = lk.count_parameters(_real_model(method))
    _, total = lk.count_parameters(_real_model("full"))
    est = _estimate(folder, method)
    assert (est.trainable, est.parameters) == (trainable, total)


def test_gradient_and_optimizer_rows_follow_the_counts(folder):
    lora, full = _estimate(folder, "lora"), _estimate(folder, "full")
    for est in (lora, full):
        assert est.gradients == 4 * est.trainable  # fp32 gradients
        assert est.optimizer == 2 * 4 * est.trainable  # AdamW's two fp32 states
    assert lora.trainable < full.trainable == full.parameters
    assert full.weights == 4 * full.parameters + _buffer_bytes()  # the tied head counted once
    assert lora.weights == full.weights + 4 * lora.trainable  # the base plus the adapter
    parts = [lora.weights, lora.gradients, lora.optimizer, lora.activations, lora.evaluation, lora.overhead,
             lora.runtime]
    assert lora.total == sum(parts)


def _buffer_bytes() -> int:
    return sum(b.numel() * b.element_size() for b in LlamaForCausalLM(LlamaConfig(**CONFIG)).buffers())


def test_qlora_weights_are_smaller(folder):
    lora, qlora = _estimate(folder, "lora"), _estimate(folder, "qlora")
    real = _real_model("qlora")
    tensors = {id(t): t for t in [*real.parameters(), *real.buffers()]}.values()
    real_bytes = sum(t.numel() * t.element_size() for t in tensors)
    assert qlora.weights == real_bytes
    assert qlora.weights < lora.weights


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
@pytest.mark.parametrize("precision, dtype", [("fp32", None), ("bf16", torch.bfloat16)])
def test_activations_match_a_real_forward(folder, method, precision, dtype):
    real = _saved_bytes(_real_model(method), dtype)
    est = _estimate(folder, method, precision).activations
    assert abs(est - real) <= 0.15 * real, (est, real)


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_evaluation_matches_a_real_forward_peak(folder, method):
    """Peak bytes the allocator holds during a real no-grad fp32 forward of one evaluation batch."""
    model = _real_model(method).eval()
    prompts = [[(3 * i + j) % CONFIG["vocab_size"] for j in range(SEQ - i % 7)] for i in range(EVAL_BATCH)]
    ids, mask = left_pad(prompts, 0, torch.device("cpu"))
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        tail_logits(model, ids, mask, 1)
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]  # signed sizes
    now = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        now += event.nbytes()
        peak = max(peak, now)
    est = _estimate(folder, method).evaluation
    assert abs(est - peak) <= 0.15 * peak, (est, peak)


def test_bf16_autocast_saves_low_precision_copies(folder):
    """Frozen linears under autocast keep a bf16 copy of their weight for backward; QLoRA layers do not."""
    lora32, lora16 = _estimate(folder, "lora", "fp32"), _estimate(folder, "lora", "bf16")
    qlora16 = _estimate(folder, "qlora", "bf16")
    assert lora16.activations != lora32.activations
    assert qlora16.activations < lora16.activations


def test_table_has_a_column_per_method(folder):
    table = estimate_table(folder, r=4, batch_size=BATCH, seq_len=SEQ)
    assert [c.header for c in table.columns][1:] == ["LoRA", "QLoRA (nf4)", "full fine-tuning"]
    assert table.row_count == 9


def test_bad_input_is_named(folder, tmp_path):
    with pytest.raises(lk.LorakitError, match="method"):
        estimate(folder, "adapter")
    with pytest.raises(lk.LorakitError, match="config.json"):
        estimate(tmp_path, "lora")
    with pytest.raises(lk.LorakitError, match="loss_tokens"):
        estimate(folder, "lora", seq_len=2, loss_tokens=2)
