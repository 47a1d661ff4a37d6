"""The compiled 4-bit decode and the keep-dequantized setting: the same bits as the eager path and bitsandbytes.

Compiling costs seconds, so only a few tests compile (one kernel, bfloat16, blocksize 64, shared through
the process's compile cache); where no kernel can be compiled they skip and say why.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit.errors import LorakitError
from lorakit.quant import Linear4bit, QuantizedTensor, compiled, keep_dequantized, quantize, quantize_model
from tiny_models import _ids, _llama, randomize_adapters

bnb = pytest.importorskip("bitsandbytes")
BF = bnb.functional

# (256, 512): whole blocks only; (257, 259): 66,563 values, a partial last block and an odd count (eager tail)
SHAPES = [(256, 512), (257, 259)]


def _eager(fn):
    was = compiled._enabled
    compiled.set_enabled(False)
    try:
        return fn()
    finally:
        compiled.set_enabled(was)


def _compiled_or_skip(fn, dtype=torch.bfloat16):
    """fn() on the compiled kernel; skip (with the reason) where this machine cannot compile one."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out = fn()
    if compiled.failure() is not None:
        pytest.skip(f"torch.compile cannot build the dequantize kernel here: {compiled.failure()}")
    assert f"cpu {str(dtype).removeprefix('torch.')} blocksize 64" in compiled.compile_seconds()  # it ran compiled
    return out


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.fixture
def compile_on(monkeypatch):
    monkeypatch.setattr(compiled, "_enabled", True)  # opt-in: off by default


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize(("dtype", "shape"), [(torch.bfloat16, SHAPES[0]), (torch.bfloat16, SHAPES[1]),
                                              (torch.float32, SHAPES[0])], ids=str)
def test_compiled_dequantize_equals_eager_and_bitsandbytes(compile_on, quant_type, dtype, shape):
    """Each output dtype is its own kernel; bitsandbytes dequantizes to the dtype it quantized from."""
    torch.manual_seed(0)
    w = (torch.randn(shape) * 0.02).to(dtype)
    qt = quantize(w, quant_type, 64, double_quant=True)
    ours = _compiled_or_skip(lambda: qt.dequantize(dtype), dtype)
    assert _same_bytes(ours, _eager(lambda: qt.dequantize(dtype)))
    packed, state = BF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type=quant_type)
    theirs = BF.dequantize_4bit(packed, state)
    # equal values; bytes differ only where FP4's second zero code decodes to -0.0 in bitsandbytes
    assert torch.equal(ours, theirs)
    assert not ours[ours.view(torch.uint8).view(-1, ours.element_size()).ne(
        theirs.view(torch.uint8).view(-1, theirs.element_size())).any(1).view(ours.shape)].any()


def test_compiled_linear4bit_step_equals_eager_and_bitsandbytes(compile_on):
    """Forward and input gradient of a 4-bit layer in training, bf16 compute: every bit as eager and as
    bitsandbytes' Linear4bit (whose training path on CPU dequantizes and multiplies the same way)."""
    torch.manual_seed(0)
    linear = nn.Linear(512, 256, bias=True)
    ours = Linear4bit.from_linear(linear, "nf4", torch.bfloat16, 64, double_quant=True)
    theirs = bnb.nn.Linear4bit(512, 256, bias=True, compute_dtype=torch.bfloat16, quant_type="nf4")
    theirs.load_state_dict(linear.state_dict())
    theirs = theirs.to("cpu").train()
    x = torch.randn(3, 5, 512, dtype=torch.bfloat16)

    def step(layer):
        xg = x.clone().requires_grad_()
        y = layer(xg)
        y.float().square().mean().backward()
        return y.detach(), xg.grad

    y, grad = _compiled_or_skip(lambda: step(ours))
    y_eager, grad_eager = _eager(lambda: step(ours))
    assert _same_bytes(y, y_eager) and _same_bytes(grad, grad_eager)
    y_bnb, grad_bnb = step(theirs)
    assert torch.equal(y, y_bnb) and torch.equal(grad, grad_bnb)


def test_a_failed_compile_falls_back_to_eager_once_with_a_warning(compile_on, monkeypatch):
    def broken(*args):
        raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found\nmore detail")

    monkeypatch.setattr(compiled, "_kernel", broken)
    monkeypatch.setattr(compiled, "_failure", None)
    monkeypatch.setattr(compiled, "_compile_seconds", {})
    qt = quantize(torch.randn(256, 512), "nf4")
    with pytest.warns(RuntimeWarning, match=f"eager kernels are used instead.*Unset {compiled.ENV}"):
        first = qt.dequantize(torch.bfloat16)
    assert compiled.failure() == "RuntimeError: InvalidCxxCompiler: no working C++ compiler found"
    assert not compiled.enabled() and compiled.compile_seconds() == {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only; later calls go straight to eager
        again = qt.dequantize(torch.bfloat16)
    assert _same_bytes(first, again) and _same_bytes(first, _eager(lambda: qt.dequantize(torch.bfloat16)))


@pytest.mark.slow  # a fresh process and a failed compile: about 10 s on a quiet machine, a minute on a busy one
def test_without_a_cpp_compiler_dequantize_still_works(tmp_path):
    """A real attempt with no compiler (CXX names nothing, empty Inductor cache): warns, then eager results."""
    script = textwrap.dedent("""
        import warnings, torch
        from lorakit.quant import compiled, quantize
        qt = quantize(torch.randn(256, 512), "nf4")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ours = qt.dequantize(torch.bfloat16)
        compiled.set_enabled(False)
        same = torch.equal(ours.view(torch.int16), qt.dequantize(torch.bfloat16).view(torch.int16))
        print(same, compiled.failure() is not None, sum("eager kernels" in str(w.message) for w in caught))
    """)
    env = os.environ | {"CXX": str(tmp_path / "no-such-c++"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache"),
                        compiled.ENV: "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-3:] == ["True", "True", "1"], done.stdout + done.stderr[-2000:]


def test_switched_on_by_environment_and_bad_values_refused(monkeypatch):
    monkeypatch.delenv(compiled.ENV, raising=False)
    assert compiled._enabled_from_env() is False  # opt-in
    for value, expected in (("0", False), ("1", True), (" 1 ", True)):
        monkeypatch.setenv(compiled.ENV, value)
        assert compiled._enabled_from_env() is expected
    monkeypatch.setenv(compiled.ENV, "yes")
    with pytest.raises(LorakitError, match=f"{compiled.ENV}='yes' is not understood; set it to 1"):
        compiled._enabled_from_env()


def _count_dequantize(monkeypatch) -> list[int]:
    calls = []
    original = QuantizedTensor.dequantize

    def counted(self, dtype=None):
        calls.append(1)
        return original(self, dtype)

    monkeypatch.setattr(QuantizedTensor, "dequantize", counted)
    return calls


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
def test_keep_dequantized_gives_the_same_bits_with_one_dequantize_less(monkeypatch, autocast):
    torch.manual_seed(0)
    layer = Linear4bit.from_linear(nn.Linear(128, 64), compute_dtype=torch.float32)
    calls = _count_dequantize(monkeypatch)
    x = torch.randn(4, 128)

    def step(keep: bool):
        layer.keep_dequantized = keep
        layer.bias.grad = None
        xg = x.clone().requires_grad_()
        calls.clear()
        saved = []
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
                y = layer(xg)
        y.float().square().sum().backward()
        dense_saved = any(t.is_floating_point() and t.numel() == 64 * 128 for t in saved)
        return y, xg.grad, layer.bias.grad, len(calls), dense_saved

    *plain, plain_calls, plain_saved = step(False)
    *kept, kept_calls, kept_saved = step(True)
    assert all(_same_bytes(a, b) for a, b in zip(plain, kept))
    assert (plain_calls, kept_calls) == (2, 1) and (plain_saved, kept_saved) == (False, True)
    calls.clear()
    with torch.no_grad():  # nothing to keep for: no backward will come
        layer(x)
    assert len(calls) == 1


def test_keep_dequantized_on_a_qlora_model_trains_the_same():
    def gradients(max_mb):
        torch.manual_seed(0)
        model = lk.inject(quantize_model(_llama(), "nf4", compute_dtype=torch.float32),
                          lk.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
        randomize_adapters(model)
        report = keep_dequantized(model, max_mb)
        ids = _ids(2, 12)
        model(input_ids=ids, labels=ids).loss.backward()
        return report, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    _, plain = gradients(0)
    report, kept = gradients(None)
    assert report.kept and not report.skipped and plain.keys() == kept.keys()
    assert all(_same_bytes(plain[n], kept[n]) for n in plain)


def test_keep_dequantized_budget_and_errors():
    model = nn.Sequential(nn.Linear(256, 512), nn.Linear(512, 1024), nn.Linear(1024, 64))  # 0.5, 2, 0.25 MiB
    quantize_model(model, "nf4", compute_dtype=torch.float32)
    report = keep_dequantized(model, max_mb=1)
    assert (report.kept, report.skipped, report.kept_mb) == (["0", "2"], ["1"], 0.75)
    assert [m.keep_dequantized for m in model] == [True, False, True]
    assert keep_dequantized(model, 0).kept == [] and not any(m.keep_dequantized for m in model)
    with pytest.raises(LorakitError, match="max_mb must be >= 0"):
        keep_dequantized(model, -1)
    with pytest.raises(LorakitError, match="no 4-bit layer"):
        keep_dequantized(nn.Linear(4, 4))
