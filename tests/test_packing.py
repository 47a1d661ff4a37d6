"""Packed batches against padded ones: the same per-sequence losses and the same gradients to round-off, a
layout that keeps sequences apart, and a model that would let them see each other falls back to padding."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit.errors import LorakitError
from lorakit.train.batching import (ATTENTION_WIDTH, IGNORE_INDEX, WIDTH_CANDIDATES, collate, pack, packed_width,
                                    packing_cost)
from lorakit.train.loop import Trainer, TrainSettings
from lorakit.train.objectives import causal_lm_loss, packed_causal_lm_loss, packed_logits, shifted_targets
from lorakit.train.packing import packing_problem, train_batching
from tiny_models import VOCAB, randomize_adapters

PAD = 0


def _examples(lengths: list[int], prompt: int = 0, seed: int = 0) -> list[dict[str, list[int]]]:
    """Distinct random examples; the first `prompt` tokens of each carry no loss (as prompt_completion)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(1, VOCAB, (n,), generator=gen).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * min(prompt, n - 1) + ids[min(prompt, n - 1):]})
    return out


def _llama(attn: str = "sdpa") -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                         max_position_embeddings=64, attn_implementation=attn))
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(model)
    return model.eval()


def _gpt2(n_positions: int = 64) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=n_positions,
                                       bos_token_id=0, eos_token_id=0))
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules=["c_attn"]))
    randomize_adapters(model)
    return model.eval()


class IgnoresPositions(nn.Module):
    """Takes position_ids but always passes a full attention mask: packed rows would attend across sequences."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None):
        return self.inner(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=False)


def test_pack_lays_examples_first_fit_decreasing_with_restarting_positions():
    examples = [{"input_ids": [1, 2], "labels": [1, 2]}, {"input_ids": [3, 4, 5, 6], "labels": [-100, -100, 5, 6]},
                {"input_ids": [7], "labels": [7]}, {"input_ids": [8, 9, 10], "labels": [8, 9, 10]}]
    batch = pack(examples, PAD, width=4)  # [3 4 5 6], [8 9 10 7], [1 2 pad pad]
    assert batch["input_ids"].tolist() == [[3, 4, 5, 6], [8, 9, 10, 7], [1, 2, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3], [0, 1, 2, 0], [0, 1, 0, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 5, 6], [-100, 9, 10, -100], [-100, 2, -100, -100]]
    # no target crosses from one example into the next: 7 is not predicted from 10
    assert shifted_targets(batch).tolist() == [[-100, 5, 6], [9, 10, -100], [2, -100, -100]]
    assert pack(examples, PAD, width=10)["input_ids"].tolist() == [[3, 4, 5, 6, 8, 9, 10, 1, 2, 7]]
    with pytest.raises(LorakitError, match="does not fit rows of width 3"):
        pack(examples, PAD, width=3)
    with pytest.raises(LorakitError, match="classification rows are padded"):
        pack([{"input_ids": [1], "label": 0}], PAD)


def test_pack_picks_the_width_whose_rows_cost_least():
    """Rows as wide as the longest example would leave a 4-token example alone in each of three rows; rows of 10
    hold all four in two. The choice is the cheapest of every width from the longest to twice it, by brute force."""
    examples = _examples([6, 4, 4, 4])
    assert pack(examples, PAD)["input_ids"].shape == (2, 10)
    assert pack(examples, PAD, width=6)["input_ids"].shape == (4, 6)
    assert packing_cost([6, 4, 4, 4], 10) == 2 * 10 * (1 + 10 / ATTENTION_WIDTH)
    assert packing_cost([6, 4, 4, 4], 6) == 4 * 6 * (1 + 6 / ATTENTION_WIDTH)

    rng = random.Random(0)
    for _ in range(50):
        lengths = [rng.randint(1, 30) for _ in range(rng.randint(1, 12))]
        width = packed_width(lengths)
        assert max(lengths) <= width <= 2 * max(lengths)
        cheapest = min(packing_cost(lengths, w) for w in range(max(lengths), 2 * max(lengths) + 1))
        assert packing_cost(lengths, width) == cheapest
    wide = [rng.randint(1, 640) for _ in range(16)]  # past WIDTH_CANDIDATES widths, candidates are spaced evenly
    assert (packed_width(wide) - max(wide)) % (max(wide) // WIDTH_CANDIDATES) == 0
    assert pack(examples[:1], PAD)["input_ids"].shape == (1, 6)  # one example: no tail to fill


def test_a_tail_wider_than_any_example_keeps_positions_the_examples_use():
    """Rows may be up to twice the longest example; a model with learned positions (GPT-2) has a table only as
    long as its context, so the pad tail counts from 0 again rather than past the longest example."""
    batch = pack(_examples([3, 2]), PAD, width=10)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 0, 1]]
    model = _gpt2(n_positions=3)
    model(input_ids=batch["input_ids"], position_ids=batch["position_ids"])  # an index error past position 2


def _per_sequence_losses(model: nn.Module, batch: dict) -> dict[tuple[int, ...], torch.Tensor]:
    """Summed token loss of each packed sequence, keyed by its tokens."""
    targets = shifted_targets(batch)
    where = (targets != IGNORE_INDEX).nonzero(as_tuple=True)
    losses = nn.functional.cross_entropy(packed_logits(model, batch, where).float(), targets[where], reduction="none")
    start = (batch["position_ids"] == 0) & (batch["attention_mask"] == 1)
    segment = start.long().cumsum(1)  # which sequence of its row a position belongs to (1-based)
    out = {}
    for r, c in zip(*start.nonzero(as_tuple=True)):
        in_row = (segment[r] == segment[r, c]) & (batch["attention_mask"][r] == 1)
        tokens = tuple(batch["input_ids"][r, in_row].tolist())
        out[tokens] = losses[(where[0] == r) & in_row[where[1]]].sum()
    return out


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_per_sequence_losses_equal_each_sequence_alone(attn):
    model = _llama(attn)
    examples = _examples([5, 17, 3, 11, 9, 2, 14, 6], prompt=2)
    batch = pack(examples, PAD)
    assert batch["input_ids"].shape[0] < len(examples)  # sequences really share rows
    with torch.no_grad():
        packed = _per_sequence_losses(model, batch)
        for example in examples:
            alone, _ = causal_lm_loss(model, collate([example], PAD, "left"))
            torch.testing.assert_close(packed[tuple(example["input_ids"])], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("build", [_llama, _gpt2])
def test_packed_loss_and_gradients_equal_padded(build):
    """The whole batch both ways, as the trainer runs it; where the probe refuses a model, packing must
    really have changed its loss (the probe was right to refuse)."""
    model = build()
    examples = _examples([5, 17, 3, 11, 9, 2, 14, 6, 8, 2], prompt=3, seed=1)
    results = []
    for loss_fn, batch in ((causal_lm_loss, collate(examples, PAD, "left")), (packed_causal_lm_loss, pack(examples, PAD))):
        model.zero_grad(set_to_none=True)
        loss, count = loss_fn(model, batch)
        loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), count, grads))
    (padded, n_padded, grads_padded), (packed, n_packed, grads_packed) = results
    assert n_packed == n_padded == sum(len(e["input_ids"]) - min(3, len(e["input_ids"]) - 1) for e in examples)
    if packing_problem(model, examples, PAD) is not None:
        assert not torch.allclose(packed, padded, rtol=1e-3, atol=1e-3)
        return
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)
    assert grads_packed.keys() == grads_padded.keys() and grads_padded
    for name in grads_padded:
        torch.testing.assert_close(grads_packed[name], grads_padded[name], rtol=1e-4, atol=1e-6, msg=name)
        assert grads_padded[name].abs().sum() > 0, name


def test_padded_loss_runs_the_output_head_as_one_matrix_multiply():
    """tail_logits asks for the kept positions by index: as a strided slice, the frozen head would run as a
    batched multiply that reads the whole (vocab x hidden) weight once per row."""
    from torch.profiler import ProfilerActivity, profile

    model = _llama()
    head = model.get_output_embeddings()
    assert not head.weight.requires_grad  # frozen by lk.inject
    batch = collate(_examples([7, 5, 9], prompt=3), PAD, padding_side="left")
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        loss, count = causal_lm_loss(model, batch)
    head_calls = [e for e in prof.events() if e.name in ("aten::mm", "aten::bmm")
                  and any(VOCAB in shape for shape in e.input_shapes if shape)]
    assert [e.name for e in head_calls] == ["aten::mm"]
    assert count == int((shifted_targets(batch) != IGNORE_INDEX).sum()) and torch.isfinite(loss)


def test_probe_refuses_a_model_that_lets_packed_sequences_meet():
    examples = _examples([6, 4, 5])
    assert packing_problem(_llama(), examples, PAD) is None
    problem = packing_problem(IgnoresPositions(_llama()), examples, PAD)
    assert problem is not None and "would see each other" in problem
    with pytest.warns(UserWarning, match="packing is off for this model"):
        collate_fn, loss_fn = train_batching(IgnoresPositions(_llama()), examples, PAD, packing=True)
    assert loss_fn is causal_lm_loss and "position_ids" not in collate_fn(examples)


def test_probe_needs_position_ids():
    class NoPositions(nn.Module):
        def forward(self, input_ids, attention_mask=None):
            raise AssertionError("not called")

    assert "takes no position_ids" in packing_problem(NoPositions(), _examples([3, 4]), PAD)


def test_training_packed_or_padded_ends_with_the_same_adapter():
    examples = _examples([5, 17, 3, 11, 9, 2, 14, 6] * 2, prompt=2, seed=2)
    adapters = []
    for packing in (False, True):
        model = _llama().train()
        collate_fn, loss_fn = train_batching(model, examples, PAD, packing)
        assert (loss_fn is packed_causal_lm_loss) == packing
        settings = TrainSettings(steps=3, batch_size=8, lr=1e-2, precision="fp32", packing=packing)
        Trainer(model, examples, collate_fn, loss_fn, settings, progress=False).run()
        adapters.append(lk.adapter_state_dict(model))
    for name in adapters[0]:
        torch.testing.assert_close(adapters[1][name], adapters[0][name], rtol=1e-4, atol=1e-5, msg=name)
