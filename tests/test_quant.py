"""4-bit quantization: byte equality with bitsandbytes, Linear4bit training and interop, whole models."""

from __future__ import annotations

import json
import logging
import weakref

import pytest
import torch
from torch import nn

from lorakit.errors import FormatError, LorakitError
from lorakit.quant import Linear4bit, QuantizedTensor, dequantize_model, quantization_report, quantize, quantize_model

bnb = pytest.importorskip("bitsandbytes")
BF = bnb.functional

QUANT_TYPES = ["nf4", "fp4"]
BLOCKSIZES = [32, 64, 128, 256, 4096]
SHAPES = [(8, 4096), (64, 128), (33, 65), (1000,), (3, 5, 70), (7,)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _bnb_quantize(w, quant_type, blocksize, double_quant):
    return BF.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type)


def _reference_dequantize(qt: QuantizedTensor, dtype) -> torch.Tensor:
    """The definition, written plainly: quant_map[code] * absmax of the element's block, in float32."""
    codes = torch.stack([qt.packed >> 4, qt.packed & 15], 1).view(-1)[: qt.numel()].long()
    scale = qt.block_absmax().repeat_interleave(qt.blocksize)[: qt.numel()]
    return (qt.quant_map[codes] * scale).to(dtype).view(qt.shape)


def _assert_same_as_bnb(w, quant_type, blocksize, double_quant):
    packed, state = _bnb_quantize(w, quant_type, blocksize, double_quant)
    qt = quantize(w, quant_type, blocksize, double_quant)
    assert torch.equal(qt.packed, packed.view(-1))
    assert qt.absmax.dtype == state.absmax.dtype and torch.equal(qt.absmax, state.absmax)
    assert torch.equal(qt.quant_map, state.code)
    if double_quant:
        assert torch.equal(qt.nested_absmax, state.state2.absmax)
        assert torch.equal(qt.nested_quant_map, state.state2.code)
        assert qt.nested_offset == state.offset.item()
    return qt, packed, state


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "no_dq"])
def test_bytes_and_values_equal_bitsandbytes(quant_type, blocksize, shape, dtype, double_quant):
    torch.manual_seed(blocksize + len(shape))
    w = (torch.randn(shape) * 0.02).to(dtype)
    qt, packed, state = _assert_same_as_bnb(w, quant_type, blocksize, double_quant)
    out = qt.dequantize()
    assert out.dtype == dtype and out.shape == w.shape
    assert torch.equal(out, _reference_dequantize(qt, dtype))
    # bitsandbytes 0.50.2's AVX-512 CPU kernel indexes absmax per row, which is wrong when an even last
    # dimension is not a multiple of the block size (odd ones go to a slow torch.compile fallback):
    # compare with it where its kernel is right; the reference above covers every shape.
    if shape[-1] % blocksize == 0:
        assert torch.equal(out, BF.dequantize_4bit(packed, state))


@pytest.mark.parametrize("step", [64, 1 << 30], ids=["many_steps", "one_step_like_gpu"])
def test_step_splitting_does_not_change_results(monkeypatch, step):
    from lorakit.quant import blockwise, steps

    torch.manual_seed(0)
    w = torch.randn(300, 256).bfloat16()
    expected = quantize(w)
    monkeypatch.setattr(steps, "CPU_STEP", step)
    monkeypatch.setattr(blockwise, "DECODE_STEP_BYTES", 4 * step)
    monkeypatch.setattr(blockwise, "WHOLE_PASS_BYTES", 0)  # the threaded steps, not the one-pass decode
    monkeypatch.setattr(steps, "MIN_STEPS_PER_THREAD", 1)
    qt = quantize(w)
    for name in ("packed", "absmax", "nested_absmax"):
        assert torch.equal(getattr(qt, name), getattr(expected, name)), name
    for dtype in (torch.bfloat16, torch.float32):
        assert torch.equal(qt.dequantize(dtype), _reference_dequantize(expected, dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_large_outputs_on_huge_pages_decode_the_same(dtype):
    from lorakit.quant import pages

    torch.manual_seed(0)
    w = torch.randn(1024, 4096, dtype=dtype)  # 8 MiB in float32: over pages.MIN_BYTES
    assert w.numel() * 4 >= pages.MIN_BYTES
    qt = quantize(w)
    assert torch.equal(qt.dequantize(torch.float32), _reference_dequantize(qt, torch.float32))
    assert torch.equal(qt.dequantize(), _reference_dequantize(qt, dtype))


SPECIAL = {
    "zeros": torch.zeros(1000),
    "constant": torch.full((1000,), 0.5),
    "zero_block": torch.cat([torch.zeros(64), torch.randn(1000)]),
    "zero_tail": torch.cat([torch.randn(128), torch.zeros(10)]),
    "subnormal": torch.randn(1000) * 1e-39,
    "huge": torch.randn(1000) * 1e37,
    "mixed_scales": torch.randn(5000) * torch.logspace(-30, 30, 5000),
}


def _boundaries(quant_type):
    table = BF.get_4bit_type(quant_type, device="cpu").sort().values
    mids = (table[:-1] + table[1:]) / 2
    around = [mids, torch.nextafter(mids, torch.tensor(2.0)), torch.nextafter(mids, torch.tensor(-2.0))]
    return torch.cat([torch.tensor([1.0]), *around, table, torch.zeros(64)])  # absmax 1: values stay exact


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("name", [*SPECIAL, "boundaries"])
def test_edge_values_equal_bitsandbytes(quant_type, name):
    torch.manual_seed(0)
    w = _boundaries(quant_type) if name == "boundaries" else SPECIAL[name]
    for double_quant in (True, False):
        _assert_same_as_bnb(w, quant_type, 64, double_quant)


def test_tables_equal_bitsandbytes():
    assert torch.equal(quantize(torch.randn(64), "nf4").quant_map, BF.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(quantize(torch.randn(64), "fp4").quant_map, BF.get_4bit_type("fp4", device="cpu"))
    assert torch.equal(quantize(torch.randn(64)).nested_quant_map, BF.create_dynamic_map(signed=True))


def test_nf4_round_trip_error_matches_qlora_and_bitsandbytes():
    torch.manual_seed(0)
    w = torch.randn(1024, 1024)
    ours = quantize(w, "nf4", 64, double_quant=True).dequantize()
    packed, state = _bnb_quantize(w, "nf4", 64, True)
    theirs = BF.dequantize_4bit(packed, state)
    rel_mse = ((w - ours) ** 2).mean() / (w**2).mean()
    assert 0.0080 < rel_mse < 0.0090
    assert torch.equal(ours, theirs)


def test_quantized_tensor_storage_and_devices():
    w = torch.randn(1024, 1024)
    qt = quantize(w)
    n = w.numel()
    expected = n // 2 + n // 64 + (n // 64 // 256) * 4 + 256 * 4 + 16 * 4
    assert qt.nbytes == expected
    assert 4.1 < qt.nbytes * 8 / n < 4.2  # bits per weight with double quantization
    assert quantize(w, double_quant=False).nbytes == n // 2 + n // 64 * 4 + 16 * 4
    moved = qt.to("cpu", copy=True)
    assert moved.packed.data_ptr() != qt.packed.data_ptr()
    assert torch.equal(moved.dequantize(torch.bfloat16), qt.dequantize(torch.bfloat16))
    assert qt.dequantize(torch.float64).dtype == torch.float64


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("double_quant", [True, False])
def test_bnb_state_dict_round_trip(quant_type, double_quant):
    w = torch.randn(48, 64, dtype=torch.bfloat16)
    qt = quantize(w, quant_type, 64, double_quant)
    _, state = _bnb_quantize(w, quant_type, 64, double_quant)
    ours = qt.to_bnb("weight")
    theirs = {"weight." + k: v for k, v in state.as_dict(packed=True).items()}
    assert list(ours)[1:] == list(theirs)
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key
    back = QuantizedTensor.from_bnb(ours, "weight")
    assert torch.equal(back.dequantize(), qt.dequantize())
    meta = json.loads(bytes(ours[f"weight.quant_state.bitsandbytes__{quant_type}"].tolist()))
    assert meta["dtype"] == "bfloat16" and meta["shape"] == [48, 64]


def test_bad_inputs_get_clear_errors():
    w = torch.randn(64, 64)
    with pytest.raises(LorakitError, match="blocksize 100 is not supported"):
        quantize(w, blocksize=100)
    with pytest.raises(LorakitError, match="blocksize 16 is not supported"):
        quantize(w, blocksize=16)
    with pytest.raises(LorakitError, match="quant_type must be 'nf4' or 'fp4'"):
        quantize(w, "int4")
    with pytest.raises(LorakitError, match="got torch.int64"):
        quantize(torch.ones(64, dtype=torch.int64))
    with pytest.raises(LorakitError, match="got torch.float64"):
        quantize(w.double())
    with pytest.raises(LorakitError, match="empty tensor"):
        quantize(torch.empty(0, 64))
    with pytest.raises(LorakitError, match="NaN or Inf in block 1"):
        quantize(torch.cat([torch.ones(64), torch.tensor([float("nan")]), torch.ones(63)]))
    with pytest.raises(LorakitError, match="meta device"):
        quantize(torch.empty(64, 64, device="meta"))
    state = quantize(w).to_bnb("weight")
    del state["weight.nested_absmax"]
    with pytest.raises(FormatError, match="missing 'weight.nested_absmax'"):
        QuantizedTensor.from_bnb(state, "weight")
    state = quantize(w).to_bnb("weight")
    state["weight.absmax"] = state["weight.absmax"][:10]
    with pytest.raises(FormatError, match="weight.absmax has 10 elements"):
        QuantizedTensor.from_bnb(state, "weight")


# ---------------------------------------------------------------- Linear4bit


def _linear(in_features=128, out_features=64, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features)


def _bnb_layer_from_state(state, in_features, out_features, compute_dtype, quant_type="nf4"):
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=True, compute_dtype=compute_dtype, quant_type=quant_type)
    stats = {k.removeprefix("weight."): v for k, v in state.items() if k.startswith("weight.")}
    layer.weight = bnb.nn.Params4bit.from_prequantized(state["weight"], stats, device="cpu", module=layer)
    layer.bias = nn.Parameter(state["bias"].clone())
    return layer


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_linear4bit_state_dict_loads_into_bitsandbytes(quant_type, compute_dtype):
    linear = _linear()
    ours = Linear4bit.from_linear(linear, quant_type, compute_dtype)
    theirs = _bnb_layer_from_state(ours.state_dict(), 128, 64, compute_dtype, quant_type)
    x = torch.randn(2, 5, 128, requires_grad=True)  # needs grad: bitsandbytes' training path, same matmul
    assert torch.equal(ours(x), theirs(x))
    # the same state dict bitsandbytes writes when it quantizes the same nn.Linear
    reference = bnb.nn.Linear4bit(128, 64, compute_dtype=compute_dtype, quant_type=quant_type)
    reference.load_state_dict(linear.state_dict())
    reference_state = reference.to("cpu").state_dict()
    ours_state = ours.state_dict()
    assert list(ours_state) == list(reference_state)
    for key, value in reference_state.items():
        if key != "bias":  # bitsandbytes keeps the bias in the linear's dtype until the first forward
            assert value.dtype == ours_state[key].dtype and torch.equal(value, ours_state[key]), key


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("double_quant", [True, False])
def test_bitsandbytes_state_dict_loads_into_linear4bit(quant_type, double_quant):
    linear = _linear(seed=1)
    theirs = bnb.nn.Linear4bit(128, 64, compute_dtype=torch.float32, quant_type=quant_type,
                               compress_statistics=double_quant)
    theirs.load_state_dict(linear.state_dict())
    theirs = theirs.to("cpu")
    ours = Linear4bit(128, 64, compute_dtype=torch.float32)  # nf4 / double-quant placeholders: the file decides
    ours.load_state_dict(theirs.state_dict())
    assert ours.quant_type == quant_type and ours.double_quant == double_quant
    x = torch.randn(3, 128, requires_grad=True)
    assert torch.equal(ours(x), theirs(x))


def test_linear4bit_forward_matches_dense_math_and_casts():
    linear = _linear()
    layer = Linear4bit.from_linear(linear, compute_dtype=torch.bfloat16)
    x = torch.randn(4, 128)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    expected = nn.functional.linear(x.bfloat16(), layer.dequantize_weight(torch.bfloat16), layer.bias)
    assert torch.equal(y, expected)
    assert layer.dequantize_weight().dtype == torch.float32 and layer.dequantize_weight().shape == (64, 128)
    assert [name for name, _ in layer.named_parameters()] == ["bias"]  # the weight can never train


def test_gradcheck_float64():
    layer = Linear4bit.from_linear(_linear(64, 8), compute_dtype=torch.float64)
    x = torch.randn(3, 64, dtype=torch.float64, requires_grad=True)
    bias = layer.bias.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x, b: torch.func.functional_call(layer, {"bias": b}, (x,)), (x, bias))


def test_autograd_keeps_no_dense_weight(monkeypatch):
    layer = Linear4bit.from_linear(_linear(256, 128), compute_dtype=torch.float32)
    dense = []
    original = QuantizedTensor.dequantize

    def tracked(self, dtype=None):
        out = original(self, dtype)
        dense.append(weakref.ref(out))
        return out

    monkeypatch.setattr(QuantizedTensor, "dequantize", tracked)
    saved = []
    x = torch.randn(4, 256, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    assert len(dense) == 1 and dense[0]() is None  # the forward's dense weight is already gone
    assert not [t for t in saved if t.is_floating_point() and t.numel() >= 128 * 256]
    assert not [v for v in vars(y.grad_fn).values() if isinstance(v, torch.Tensor)]
    y.sum().backward()
    assert len(dense) == 2 and dense[1]() is None and x.grad is not None


def test_eval_no_grad_forward_does_not_change_gradients():
    layer = Linear4bit.from_linear(_linear(), compute_dtype=torch.float32)
    x = torch.randn(4, 128, requires_grad=True)

    def grads():
        x.grad = None
        layer.bias.grad = None
        layer(x).pow(2).sum().backward()
        return x.grad.clone(), layer.bias.grad.clone()

    before = grads()
    layer.eval()
    with torch.no_grad():
        layer(x)
    layer.train()
    after = grads()
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_module_dtype_casts_keep_statistics_float32():
    layer = Linear4bit.from_linear(_linear(), compute_dtype=torch.float32, double_quant=False)
    weight = layer.dequantize_weight()
    layer.to(torch.bfloat16).half()
    assert layer.absmax.dtype == torch.float32 and layer.quant_map.dtype == torch.float32
    assert layer.weight.dtype == torch.uint8 and layer.bias.dtype == torch.float16
    assert torch.equal(layer.dequantize_weight(), weight)


def test_linear4bit_loading_dense_meta_partial_and_broken_state_dicts():
    linear = _linear()
    layer = Linear4bit(128, 64, compute_dtype=torch.float32)
    layer.load_state_dict(linear.state_dict())  # a dense checkpoint is quantized on load
    assert torch.equal(layer.dequantize_weight(), quantize(linear.weight.detach()).dequantize())
    skeleton = Linear4bit(128, 64, compute_dtype=torch.float32, device="meta")
    skeleton.load_state_dict(layer.state_dict())
    x = torch.randn(2, 128)
    assert torch.equal(skeleton(x), layer(x))
    result = Linear4bit(128, 64).load_state_dict({"extra": torch.zeros(1)}, strict=False)
    assert result.missing_keys == ["weight", "bias"] and result.unexpected_keys == ["extra"]
    state = layer.state_dict()
    del state["weight.absmax"]
    with pytest.raises(FormatError, match="missing 'weight.absmax'"):
        Linear4bit(128, 64).load_state_dict(state)
    with pytest.raises(FormatError, match=r"shape \[64, 128\] but this layer is"):
        Linear4bit(64, 128).load_state_dict(layer.state_dict())


def test_linear4bit_state_dict_saves_with_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    layer = Linear4bit.from_linear(_linear(), compute_dtype=torch.float32)
    save_file(layer.state_dict(), tmp_path / "layer.safetensors")
    loaded = Linear4bit(128, 64, compute_dtype=torch.float32)
    loaded.load_state_dict(load_file(tmp_path / "layer.safetensors"))
    x = torch.randn(2, 128)
    assert torch.equal(loaded(x), layer(x))


# ---------------------------------------------------------------- whole models


def _tiny_llama(tie=False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=tie)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_quantize_model_llama(tie, caplog):
    model = _tiny_llama(tie)
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        dense_logits = model(ids).logits
    dense_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    with caplog.at_level(logging.INFO, logger="lorakit.quant"):
        assert quantize_model(model, "nf4", compute_dtype=torch.float32, skip=[]) is model
    assert "14 linear layers in 4 bits" in caplog.text
    quantized = {n for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    assert len(quantized) == 14 and "lm_head" not in quantized  # 7 per decoder layer; the head stays dense
    report = quantization_report(model)
    assert report.layers == 14 and report.model_bytes_before == dense_bytes
    assert report.quantized_bytes < report.dense_bytes / 5
    with torch.no_grad():
        logits = model(ids).logits
    assert (logits - dense_logits).norm() / dense_logits.norm() < 0.25  # 4-bit noise through 2 random layers
    # a fresh quantized skeleton loads the quantized state dict and gives the same logits
    skeleton = quantize_model(_tiny_llama(tie), "nf4", compute_dtype=torch.float32, skip=[])
    skeleton.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(skeleton(ids).logits, logits)
    dequantize_model(model)
    assert not any(isinstance(m, Linear4bit) for m in model.modules())
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, logits, atol=1e-5)


def test_quantize_model_plain_module_skip_and_errors():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8)))
    attention = nn.MultiheadAttention(64, 4)
    model.append(attention)
    quantize_model(model, skip=["2.1"])
    assert isinstance(model[0], Linear4bit) and isinstance(model[2][0], Linear4bit)
    assert type(model[2][1]) is nn.Linear  # skipped by dotted name
    assert type(attention.out_proj) is not Linear4bit  # read directly by MultiheadAttention
    with pytest.raises(LorakitError, match="Linear4bit.from_linear"):
        quantize_model(nn.Linear(64, 64))
    with pytest.raises(LorakitError, match="blocksize"):
        quantize_model(nn.Sequential(nn.Linear(64, 64)), blocksize=48)
    with pytest.raises(LorakitError, match="cannot quantize 0: .*got torch.float64"):
        quantize_model(nn.Sequential(nn.Linear(64, 64)).double())


def _tiny_gpt2():
    from tiny_models import _gpt2

    torch.manual_seed(0)
    return _gpt2().eval()


GPT2_LINEARS = [f"transformer.h.{i}.{part}" for i in range(2)
                for part in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]


def test_quantize_model_gpt2_conv1d_computes_as_its_dequantized_weights():
    from tiny_models import _ids

    base = _tiny_gpt2()
    model = quantize_model(_tiny_gpt2(), "nf4", compute_dtype=torch.float32)
    assert [n for n, m in model.named_modules() if isinstance(m, Linear4bit)] == GPT2_LINEARS
    assert type(model.lm_head) is nn.Linear  # the output head (tied to wte) stays dense
    c_attn = model.transformer.h[0].attn.c_attn
    assert (c_attn.in_features, c_attn.out_features) == (32, 96)  # Conv1D's (in, out) weight, as nn.Linear
    # the original Conv1D model holding the dequantized weights (transposed back) computes the same
    with torch.no_grad():
        for name in GPT2_LINEARS:
            base.get_submodule(name).weight.copy_(model.get_submodule(name).dequantize_weight().T)
    ids = _ids(2)
    with torch.no_grad():
        logits = model(ids).logits
        torch.testing.assert_close(logits, base(ids).logits, atol=1e-5, rtol=0)
        assert torch.equal(dequantize_model(model)(ids).logits, logits)  # same F.linear on the same values


def test_gpt2_state_dict_equals_transformers_with_bitsandbytes(tmp_path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    _tiny_gpt2().save_pretrained(tmp_path)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=config, device_map="cpu").state_dict()
    ours = quantize_model(_tiny_gpt2(), "nf4", compute_dtype=torch.float32).state_dict()
    assert list(ours) == list(theirs)
    for key, value in theirs.items():
        assert value.dtype == ours[key].dtype and torch.equal(value, ours[key]), key


def test_qlora_on_gpt2_conv1d_layers_saves_and_loads(tmp_path):
    import lorakit as lk
    from lorakit.layers import LoraLayer
    from tiny_models import _ids, randomize_adapters

    model = quantize_model(_tiny_gpt2(), "nf4", compute_dtype=torch.float32)
    ids = _ids(2)
    with torch.no_grad():
        base_logits = model(ids).logits
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules=["c_attn", "c_proj", "c_fc"]))
    assert all(isinstance(model.get_submodule(n), LoraLayer) for n in GPT2_LINEARS)
    randomize_adapters(model)
    with torch.no_grad():
        logits = model(ids).logits
    assert not torch.allclose(logits, base_logits)
    lk.save(model, tmp_path / "adapter")
    torch.save(model.state_dict(), tmp_path / "model.pt")
    # the adapter folder on a freshly quantized base, and the whole state dict on a quantized skeleton
    fresh = lk.load(quantize_model(_tiny_gpt2(), "nf4", compute_dtype=torch.float32), tmp_path / "adapter")
    skeleton = lk.inject(quantize_model(_tiny_gpt2(), "nf4", compute_dtype=torch.float32),
                         lk.LoraConfig(r=4, alpha=8, target_modules=["c_attn", "c_proj", "c_fc"]))
    skeleton.load_state_dict(torch.load(tmp_path / "model.pt"))
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, logits)
        assert torch.equal(skeleton(ids).logits, logits)
