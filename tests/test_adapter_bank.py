"""The serving bank (lorakit/layers/adapter_bank.py): every way it adds rows' terms (embedding_bag for one
token per row, a per-row gather for prompts) equals lk.route's gather path and each row run alone with only
its adapter active; mixed ranks and target sets, base rows, rsLoRA, fp32 and bf16, and a bank changed by
loading and unloading adapters."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit as lk
from lorakit.layers import adapter_bank
from lorakit.layers.adapter_bank import AdapterBank, BankedRoutePlan
from lorakit.layers.indexed_matmul import bag_index, bag_lora, gathered_lora
from lorakit.state import lora_layers

# name -> (rank, alpha, targets, rsLoRA): different ranks, target sets and scalings on purpose
ADAPTERS = {
    "a": (8, 16, ["q_proj", "v_proj"], False),
    "b": (4, 3, "all-linear", True),
    "c": (16, 8, ["o_proj", "down_proj", "up_proj"], False),
    "d": (2, 5, ["k_proj", "gate_proj", "v_proj"], True),
}
ROWS = [None, "a", "b", "c", "a", None, "b", "c"]
TOLERANCE = {torch.float32: dict(atol=2e-5, rtol=1e-5), torch.bfloat16: dict(atol=3e-2, rtol=2e-2)}


def tiny_model(dtype: torch.dtype, names=("a", "b", "c")) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=2, hidden_size=48, intermediate_size=96, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval().to(dtype)
    for name in names:
        add(model, name)
    lk.set_active(model, None)
    return model


def add(model: torch.nn.Module, name: str) -> None:
    r, alpha, targets, rslora = ADAPTERS[name]
    config = lk.LoraConfig(r=r, alpha=alpha, target_modules=targets, use_rslora=rslora)
    lk.add_adapter(model, name, config) if lk.state.find_state(model) else lk.inject(model, config, adapter=name)
    torch.manual_seed(sorted(ADAPTERS).index(name) + 1)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if f"lora_A.{name}" in param_name or f"lora_B.{name}" in param_name:
                param.normal_(0, 0.3)


def filled_bank(model: torch.nn.Module, names=("a", "b", "c")) -> AdapterBank:
    bank = AdapterBank()
    for name in names:
        bank.add([layer for _, layer in lora_layers(model)], name)
    return bank


def banked(model, bank, rows, ids):
    plan = BankedRoutePlan(rows, bank, ids.device)
    layers = [layer for _, layer in lora_layers(model)]
    for layer in layers:
        layer.lora_routes = plan
    try:
        return model(ids).logits
    finally:
        for layer in layers:
            layer.lora_routes = None


def per_row(model, rows, ids):
    """Each row through the model alone, with only its own adapter (or none) active."""
    outs = []
    for i, name in enumerate(rows):
        lk.set_active(model, name)
        outs.append(model(ids[i:i + 1]).logits)
    lk.set_active(model, None)
    return torch.cat(outs)


class Spy:
    """Counts calls of one of adapter_bank's two paths."""

    def __init__(self, monkeypatch, name):
        self.calls, real = 0, getattr(adapter_bank, name)

        def counted(*args):
            self.calls += 1
            return real(*args)

        monkeypatch.setattr(adapter_bank, name, counted)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tokens", [1, 5], ids=["decode", "prompt"])
def test_bags_and_gather_equal_lk_route_and_each_row_alone(dtype, tokens, monkeypatch):
    model = tiny_model(dtype)
    bank = filled_bank(model)
    ids = torch.randint(0, 100, (len(ROWS), tokens))
    with torch.inference_mode():
        alone = per_row(model, ROWS, ids)
        with lk.route(model, ROWS, strategy="gather"):
            routed = model(ids).logits
        results, default = {}, adapter_bank.BAG_TOKENS  # default: one token per row is bagged, five are not
        assert 1 <= default < 5
        for path, bag_tokens in (("bags", 10), ("gather", 0), ("default", default)):
            monkeypatch.setattr(adapter_bank, "BAG_TOKENS", bag_tokens)
            bags, gathers = Spy(monkeypatch, "bag_lora"), Spy(monkeypatch, "gathered_lora")
            into = Spy(monkeypatch, "gathered_lora_into")
            results[path] = banked(model, bank, ROWS, ids)
            assert (bags.calls > 0, gathers.calls + into.calls > 0) == {
                "bags": (True, False), "gather": (False, True), "default": (tokens <= default, tokens > default)}[path]
            if path == "gather" and dtype == torch.float32:  # no autograd, one dtype: most layers add in place
                assert into.calls > gathers.calls
            monkeypatch.undo()
        base = model(ids).logits  # the same batch with no adapter active
    for path, out in results.items():
        torch.testing.assert_close(out, alone, **TOLERANCE[dtype], msg=path)
        torch.testing.assert_close(out, routed, **TOLERANCE[dtype], msg=path)
        torch.testing.assert_close(out[[0, 5]], base[[0, 5]], atol=0, rtol=0, msg=path)  # base rows: exactly the base
    moved = (alone - base).abs().amax(dim=(1, 2))
    assert (moved[[1, 2, 3, 4, 6, 7]] > 10 * TOLERANCE[dtype]["atol"]).all()  # the adapters really matter


def test_every_row_routed_and_a_batch_of_one():
    """No base row (no empty bags), and lk.route's batch-1 broadcast of shared inputs."""
    model = tiny_model(torch.float32)
    bank = filled_bank(model)
    with torch.inference_mode():
        for rows in (["b", "a", "c", "b"], ["c"]):
            ids = torch.randint(0, 100, (len(rows), 1))
            torch.testing.assert_close(banked(model, bank, rows, ids), per_row(model, rows, ids),
                                       **TOLERANCE[torch.float32])


def test_load_and_unload_change_the_bank():
    """Unloading frees a slot (zeroed), a later adapter takes it, a larger rank pads the tables; every row
    still equals its adapter alone."""
    model = tiny_model(torch.float32, names=("a", "b"))
    bank = filled_bank(model, ("a", "b"))
    layers = [layer for _, layer in lora_layers(model)]
    slot_a = bank.slots["a"]
    bank.remove("a")
    lk.delete_adapter(model, "a")
    q = model.model.layers[0].self_attn.q_proj
    A, B = bank.stacks[id(q)]
    assert not A[slot_a].any() and not B[slot_a].any()
    for name in ("c", "d"):  # c (r=16) grows the rank of every table it shares with b (r=4)
        add(model, name)
        lk.set_active(model, None)
        bank.add(layers, name)
    assert bank.slots["c"] == slot_a and bank.stacks[id(model.model.layers[0].mlp.down_proj)][0].shape[2] == 16
    rows = [None, "c", "d", "b", "d", "c"]
    ids = torch.randint(0, 100, (len(rows), 1))
    with torch.inference_mode():
        torch.testing.assert_close(banked(model, bank, rows, ids), per_row(model, rows, ids),
                                   **TOLERANCE[torch.float32])


def test_tables_hold_transposed_a_and_scaled_b_with_zero_padding():
    model = tiny_model(torch.float32)
    bank = filled_bank(model)
    layer = model.model.layers[1].self_attn.v_proj  # a (r=8) and b (r=4, rsLoRA) share it
    A, B = bank.stacks[id(layer)]
    assert A.shape[2] == B.shape[1] == 8
    for name in ("a", "b"):
        slot, spec = bank.slots[name], layer.lora_adapters[name]
        torch.testing.assert_close(A[slot, :, :spec.r], layer.lora_A[name].detach().T, atol=0, rtol=0)
        torch.testing.assert_close(B[slot, :spec.r], (spec.scaling * layer.lora_B[name].detach()).T)
        assert not A[slot, :, spec.r:].any() and not B[slot, spec.r:].any()
    assert bank.holds(layer, ("a", "b")) and not bank.holds(layer, ("c",))


def test_bag_lora_equals_the_gather_of_each_row():
    """The two kernels of indexed_matmul.py on random tables, with empty bags for unrouted tokens."""
    torch.manual_seed(0)
    A, B = torch.randn(5, 12, 3), torch.randn(5, 3, 7)
    slots = torch.tensor([2, -1, 4, 2, -1, 1])
    x = torch.randn(len(slots), 12)
    routed = (slots >= 0).nonzero().view(-1)
    y = bag_lora(x, A, B, bag_index(slots, 12), bag_index(slots, 3), routed)
    want = gathered_lora(x[routed, None], A, B, slots[routed], torch.float32)[:, 0]
    torch.testing.assert_close(y[routed], want)
    assert not y[slots < 0].any()
    for i in routed.tolist():
        torch.testing.assert_close(y[i], B[slots[i]].T @ (A[slots[i]].T @ x[i]))


def test_autocast_gathers_in_its_dtype():
    """A compute dtype other than the tables' (autocast) takes the gather path, which converts the rows."""
    model = tiny_model(torch.float32)
    bank = filled_bank(model)
    ids = torch.randint(0, 100, (len(ROWS), 1))
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = banked(model, bank, ROWS, ids)
        with lk.route(model, ROWS, strategy="group"):
            grouped = model(ids).logits
    torch.testing.assert_close(out, grouped, **TOLERANCE[torch.bfloat16])
