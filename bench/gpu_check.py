"""The CUDA check, ready for when a GPU is lent: one command, under 8 minutes on one GPU.

Checks (each must pass; the exit status is 1 if one fails), on a small Llama in float32 unless noted:
  forward_vs_peft        lorakit LoRA logits equal PEFT's on the same adapter (saved by lorakit, loaded by PEFT)
  nf4_bytes_vs_bnb       lk.quant.quantize codes and statistics byte-equal to bitsandbytes' quantize_4bit on the
                         same device (its CUDA kernels on a GPU), dequantized values equal too
  qlora_gradients        LoRA gradients on an NF4 base equal those on the dequantized (dense) base
  merge_exact            merged logits equal unmerged ones; unmerge restores the weights
  routed_vs_per_adapter  one lk.route batch (a different adapter or none per row) equals each row run alone
Measurements, side by side in one process (ms medians after warm-up, CUDA synchronized; peak = CUDA memory):
  lora_step    ~1B Llama-shaped model (random init from a config, bf16), AdamW: the frozen floor (forward +
               backward to the input embeddings), lorakit and PEFT with r=8 on q,v and r=16 on every linear
  qlora_step   the same model: lorakit 16-bit LoRA, lorakit QLoRA (NF4, bf16 compute; eager, then with the opt-in
               compiled dequantize: Triton on CUDA), PEFT + bitsandbytes QLoRA
  dequantize   NF4 -> bf16 of an 8192 x 8192 weight (and quantize), lorakit (eager, compiled) vs bitsandbytes
  decode       bench_route's decode64 (64 rows x 1 token on a 256-token static cache, 64 adapters): base, PEFT
               adapter_names, lorakit route (auto), the server's adapter bank (a new plan every step) and
               route held over the steps
The measurements stop at --budget seconds (default 420) and whatever finished is still printed and written.
Models are random-init from configs: the GPU machine cannot download. `--device cpu --tiny` runs every part
on tiny shapes on the CPU in seconds (tests/test_gpu_check.py runs it so the script cannot rot).
Run: python bench/gpu_check.py [--out gpu_check.json] [--budget 420]    (writes $OUT/gpu_check.json if $OUT is set)
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import bench_core
import bench_qlora
import bench_quant
import bench_route
import torch
from harness import table, time_median
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import lorakit as lk
from lorakit.layers.adapter_bank import AdapterBank
from lorakit.quant import compiled
from lorakit.serve.batch import routed
from lorakit.state import lora_layers

CHECK_TOLERANCE = 1e-4  # float32 logits and gradients (relative to their scale)
NO_CUDA = 2  # exit status when there is no GPU and --device cpu was not given


@dataclass(frozen=True)
class Sizes:
    """Every shape the script uses; `tiny` shrinks them all so the CPU runs the whole script in seconds."""

    big: LlamaConfig  # the ~1B model of the step measurements
    batch: int
    seq: int
    weight: int  # the dequantize benchmark's weight is weight x weight
    odd: tuple[int, int]  # a weight whose last absmax block is partial
    route: bench_route.Shape
    route_model: Callable[[], nn.Module]
    warmup: int
    repeats: int


def _llama_1b() -> LlamaConfig:
    """TinyLlama-1.1B's shape: 22 layers of 2048 wide, grouped-query attention, 32k vocabulary."""
    return LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                       num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048,
                       tie_word_embeddings=False)


def _tiny_gpt2() -> nn.Module:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=64)).eval()


FULL = Sizes(big=_llama_1b(), batch=8, seq=512, weight=8192, odd=(333, 1001), route=bench_route.SHAPES["decode64"],
             route_model=bench_route._model, warmup=3, repeats=10)
TINY = Sizes(big=LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=256, tie_word_embeddings=False),
             batch=2, seq=16, weight=256, odd=(30, 100),
             route=replace(bench_route.SHAPES["decode64"], rows=4, cache=8, adapters=2, repeats=2),
             route_model=_tiny_gpt2, warmup=1, repeats=2)
SMALL = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
                    num_key_value_heads=4, vocab_size=1000, tie_word_embeddings=False)  # the checks' model


class OverBudget(Exception):
    """Raised by the alarm when the measurements pass --budget seconds."""


def _on_alarm(signum, frame) -> None:
    raise OverBudget()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(step: Callable[[], object], device: torch.device, sizes: Sizes) -> float:
    """harness.time_median of `step` with the device synchronized after each call, in milliseconds."""

    def synced() -> None:
        step()
        _sync(device)

    return 1000 * time_median(synced, warmup=sizes.warmup, repeats=sizes.repeats)


def _fresh_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def _llama(config: LlamaConfig, device: torch.device, dtype: torch.dtype, seed: int = 0) -> LlamaForCausalLM:
    """Random init from the config, built on the device (a 1B model inits in a second on a GPU)."""
    torch.manual_seed(seed)
    with torch.device(device):
        return LlamaForCausalLM(config).to(dtype)


def _ids(vocab: int, rows: int, seq: int, device: torch.device) -> torch.Tensor:
    return torch.randint(0, vocab, (rows, seq), generator=torch.Generator().manual_seed(2)).to(device)


def _gap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference relative to the reference's largest magnitude."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-30)).item()


QV = bench_core.Setting("r=8 q,v", targets=("q_proj", "v_proj"))
ALL_LINEAR = bench_core.Setting("r=16 all linear", r=16, targets="all-linear")


# ---- checks ---------------------------------------------------------------------------------------------
def check_forward_vs_peft(device: torch.device, sizes: Sizes) -> dict:
    import peft

    model = _llama(SMALL, device, torch.float32)
    plain = copy.deepcopy(model)
    ours = bench_core._adapt(model, "lorakit", QV).eval()
    ids = _ids(SMALL.vocab_size, 2, 24, device)
    with tempfile.TemporaryDirectory() as folder:
        lk.save(ours, folder)
        theirs = peft.PeftModel.from_pretrained(plain, folder).eval()
    with torch.no_grad():
        expected = theirs(ids).logits
        gap = _gap(ours(ids).logits, expected)
        with lk.disabled(ours):
            effect = _gap(ours(ids).logits, expected)
    return {"ok": gap < CHECK_TOLERANCE and effect > 100 * CHECK_TOLERANCE, "max_rel_error": gap,
            "adapter_effect": effect}


def check_nf4_bytes_vs_bnb(device: torch.device, sizes: Sizes) -> dict:
    import bitsandbytes.functional as BF

    result: dict = {"ok": True}
    for rows, cols in ((sizes.weight, sizes.weight), sizes.odd):
        w = (torch.randn(rows, cols, generator=torch.Generator().manual_seed(3)) * 0.02).to(device, torch.bfloat16)
        qt = lk.quant.quantize(w, "nf4", 64, double_quant=True)
        packed, state = BF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        differing = {
            "codes": int((qt.packed != packed.view(-1)).sum()),
            "absmax_codes": int((qt.absmax != state.absmax).sum()),
            "nested_absmax": int((qt.nested_absmax != state.state2.absmax).sum()),
            "nested_offset": float(qt.nested_offset - state.offset.item()),
        }
        values = int((qt.dequantize() != BF.dequantize_4bit(packed, state)).sum())
        same = not any(differing.values()) and values == 0
        result[f"{rows}x{cols}"] = {"identical": same, "differing": differing, "differing_values": values}
        result["ok"] &= same
    return result


def check_qlora_gradients(device: torch.device, sizes: Sizes) -> dict:
    grads = []
    for dense in (False, True):
        model = lk.quantize_model(_llama(SMALL, device, torch.float32), "nf4", compute_dtype=torch.float32)
        if dense:
            lk.dequantize_model(model)
        model = bench_core._adapt(model, "lorakit", ALL_LINEAR).train()
        ids = _ids(SMALL.vocab_size, 2, 24, device)
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    gap = max(_gap(grads[0][n], grads[1][n]) for n in grads[1])
    return {"ok": grads[0].keys() == grads[1].keys() and gap < CHECK_TOLERANCE, "max_rel_error": gap,
            "tensors": len(grads[1])}


def check_merge_exact(device: torch.device, sizes: Sizes) -> dict:
    model = bench_core._adapt(_llama(SMALL, device, torch.float32), "lorakit", ALL_LINEAR).eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    ids = _ids(SMALL.vocab_size, 2, 24, device)
    with torch.no_grad():
        unmerged = model(ids).logits
        lk.merge(model)
        gap = _gap(model(ids).logits, unmerged)
        lk.unmerge(model)
    restored = max((p.detach() - before[n]).abs().max().item() for n, p in model.named_parameters() if n in before)
    return {"ok": gap < CHECK_TOLERANCE and restored < 1e-6, "merged_max_rel_error": gap,
            "unmerge_max_abs_error": restored}


def check_routed_vs_per_adapter(device: torch.device, sizes: Sizes) -> dict:
    model = _llama(SMALL, device, torch.float32)
    torch.manual_seed(4)
    lk.inject(model, QV.lorakit(), adapter="a")
    lk.add_adapter(model, "b", QV.lorakit())
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.normal_(std=0.05)
    model.eval()
    rows = ["a", "b", None, "b"]
    ids = _ids(SMALL.vocab_size, len(rows), 24, device)
    with torch.no_grad(), lk.route(model, rows):
        routed = model(ids).logits
    alone = []
    for i, name in enumerate(rows):
        with torch.no_grad():
            if name is None:
                with lk.disabled(model):
                    alone.append(model(ids[i:i + 1]).logits)
            else:
                lk.set_active(model, name)
                alone.append(model(ids[i:i + 1]).logits)
    gap = _gap(routed, torch.cat(alone))
    return {"ok": gap < CHECK_TOLERANCE, "max_rel_error": gap}


CHECKS = {"forward_vs_peft": check_forward_vs_peft, "nf4_bytes_vs_bnb": check_nf4_bytes_vs_bnb,
          "qlora_gradients": check_qlora_gradients, "merge_exact": check_merge_exact,
          "routed_vs_per_adapter": check_routed_vs_per_adapter}


# ---- measurements ---------------------------------------------------------------------------------------
def _train_step(model: nn.Module, ids: torch.Tensor) -> Callable[[], None]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _floor_step(model: nn.Module, ids: torch.Tensor) -> Callable[[], None]:
    """Forward + backward to the input embeddings with every weight frozen: the least LoRA can cost."""
    model.requires_grad_(False)
    embed = model.get_input_embeddings()

    def step() -> None:
        inputs = embed(ids).detach().requires_grad_()
        model(inputs_embeds=inputs, labels=ids).loss.backward()

    return step


def _step_row(name: str, build: Callable[[], tuple[nn.Module, Callable[[], None]]], device: torch.device,
              sizes: Sizes) -> dict:
    _fresh_peak(device)
    model, step = build()
    ms = _timed(step, device, sizes)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"config": name, "ms": ms, "peak_mb": _peak_mb(device), "trainable": trainable,
            "model_mb": bench_qlora._model_bytes(model) / 2**20}


def measure_lora_step(device: torch.device, sizes: Sizes, rows: list[dict]) -> dict:
    ids = _ids(sizes.big.vocab_size, sizes.batch, sizes.seq, device)

    def base() -> nn.Module:
        return _llama(sizes.big, device, torch.bfloat16).train()

    def floor() -> tuple[nn.Module, Callable[[], None]]:
        model = base()
        return model, _floor_step(model, ids)

    def adapted(library: str, setting: bench_core.Setting) -> Callable[[], tuple[nn.Module, Callable[[], None]]]:
        def build() -> tuple[nn.Module, Callable[[], None]]:
            model = bench_core._adapt(base(), library, setting)
            return model, _train_step(model, ids)

        return build

    rows.append(_step_row("floor", floor, device, sizes))
    for setting in (QV, ALL_LINEAR):
        for library in bench_core.LIBRARIES:
            rows.append(_step_row(f"{library} {setting.label}", adapted(library, setting), device, sizes))
    floor = rows[0]["ms"]
    for row in rows:
        row["x_floor"] = row["ms"] / floor
    for row in rows[1:]:
        twin = next((r for r in rows if r["config"] == row["config"].replace("lorakit", "peft")), None)
        row["x_peft"] = row["ms"] / twin["ms"] if twin and "lorakit" in row["config"] else None
    with torch.device("meta"):
        shapes = LlamaForCausalLM(sizes.big)
    non_embedding = sum(p.numel() for n, p in shapes.named_parameters() if "embed" not in n and "lm_head" not in n)
    tflop = 4 * non_embedding * sizes.batch * sizes.seq / 1e12  # forward + input-gradient backward
    return {"model_tflop_per_step": tflop, "floor_tflops": tflop / (floor / 1000)}


def measure_qlora_step(device: torch.device, sizes: Sizes, rows: list[dict]) -> dict:
    ids = _ids(sizes.big.vocab_size, sizes.batch // 2, sizes.seq, device)

    def lora16() -> tuple[nn.Module, Callable[[], None]]:
        model = bench_core._adapt(_llama(sizes.big, device, torch.bfloat16), "lorakit", ALL_LINEAR).train()
        return model, _train_step(model, ids)

    def qlora() -> tuple[nn.Module, Callable[[], None]]:
        model = lk.quantize_model(_llama(sizes.big, device, torch.bfloat16), "nf4", compute_dtype=torch.bfloat16)
        model = bench_core._adapt(model, "lorakit", ALL_LINEAR).train()
        return model, _train_step(model, ids)

    def peft_bnb() -> tuple[nn.Module, Callable[[], None]]:
        model = _llama(sizes.big, device, torch.bfloat16)
        bench_qlora._bnb_quantize(model, device)
        model = bench_core._adapt(model, "peft", ALL_LINEAR).train()
        return model, _train_step(model, ids)

    def qlora_compiled() -> tuple[nn.Module, Callable[[], None]]:
        model, step = qlora()
        return model, bench_quant._compiled(step)

    for name, build in (("lorakit lora16", lora16), ("lorakit qlora", qlora),
                        ("lorakit qlora, compiled dequantize", qlora_compiled), ("peft+bnb qlora", peft_bnb)):
        rows.append(_step_row(name, build, device, sizes))
    times = {r["config"]: r["ms"] for r in rows}
    return {"qlora_x_lora16": times["lorakit qlora"] / times["lorakit lora16"],
            "qlora_x_peft_bnb": times["lorakit qlora"] / times["peft+bnb qlora"],
            "compiled_qlora_x_peft_bnb": times["lorakit qlora, compiled dequantize"] / times["peft+bnb qlora"],
            "compile_seconds": compiled.compile_seconds(), "compile_failure": compiled.failure()}


def measure_dequantize(device: torch.device, sizes: Sizes, rows: list[dict]) -> dict:
    import bitsandbytes.functional as BF

    w = (torch.randn(sizes.weight, sizes.weight, generator=torch.Generator().manual_seed(3)) * 0.02)
    w = w.to(device, torch.bfloat16)
    qt = lk.quant.quantize(w, "nf4", 64, double_quant=True)
    packed, state = BF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")

    def synced(fn: Callable[[], object]) -> Callable[[], None]:
        return lambda: (fn(), _sync(device))

    pairs = {
        "quantize bf16": (lambda: lk.quant.quantize(w, "nf4", 64, double_quant=True),
                          lambda: BF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")),
        "dequantize -> bf16": (qt.dequantize, lambda: BF.dequantize_4bit(packed, state)),
        "dequantize -> bf16, compiled": (bench_quant._compiled(qt.dequantize),
                                         lambda: BF.dequantize_4bit(packed, state)),
    }
    for name, (ours, theirs) in pairs.items():
        a, b = bench_quant._paired_medians(synced(ours), synced(theirs), sizes.warmup, sizes.repeats)
        rows.append({"config": name, "lorakit_ms": a, "bnb_ms": b, "x_bnb": a / b})
    return {"weight": f"{sizes.weight}x{sizes.weight}"}


def measure_decode(device: torch.device, sizes: Sizes, rows: list[dict]) -> dict:
    shape = sizes.route
    row_names = shape.row_adapters()

    def build(method: str) -> Callable[[], torch.Tensor]:
        model = sizes.route_model().to(device)
        inputs = bench_route._inputs(model, shape)
        if method == "base":
            return lambda: bench_route._forward(model, inputs)
        bench_route._add_adapters(model, shape)
        if method == "peft":
            with tempfile.TemporaryDirectory() as folder:
                bench_route._save(model, shape, Path(folder))
                theirs = bench_route._peft(lk.unload(model, merge=False), shape, Path(folder))
            return lambda: bench_route._forward(theirs, inputs, adapter_names=row_names)
        if method == "lorakit bank":  # the server's path: persistent adapter tables, a new plan every step
            bank = AdapterBank()
            for name in shape.names():
                bank.add((layer for _, layer in lora_layers(model)), name)

            def step() -> torch.Tensor:
                with routed(model, bank, row_names):
                    return bench_route._forward(model, inputs)
            return step
        if method == "lorakit held":
            lk.route(model, row_names).__enter__()  # held for the rest of this (discarded) model's life
            return lambda: bench_route._forward(model, inputs)
        call = bench_route._routed(model, row_names, "auto")
        return lambda: call(inputs)

    for method in ("base", "peft", "lorakit route", "lorakit bank", "lorakit held"):
        _fresh_peak(device)
        ms = _timed(build(method), device, sizes)
        rows.append({"config": method, "ms": ms, "tokens_per_s": shape.rows * shape.tokens / (ms / 1000),
                     "peak_mb": _peak_mb(device)})
    times = {r["config"]: r["ms"] for r in rows}
    targets = shape.targets if isinstance(shape.targets, str) else ",".join(shape.targets)
    return {"shape": f"{shape.rows} rows x {shape.tokens} token on a {shape.cache}-token static cache, "
                     f"{shape.adapters} adapters, r={shape.r} on {targets}",
            "lorakit_route_x_peft_time": times["lorakit route"] / times["peft"],
            "lorakit_held_x_peft_time": times["lorakit held"] / times["peft"],
            "lorakit_bank_x_base_time": times["lorakit bank"] / times["base"]}


MEASUREMENTS = {"lora_step": measure_lora_step, "qlora_step": measure_qlora_step, "dequantize": measure_dequantize,
                "decode": measure_decode}


# ---- running and reporting ------------------------------------------------------------------------------
def _environment(device: torch.device) -> dict:
    import bitsandbytes
    import peft
    import transformers

    env = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": str(device),
           "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
           "peft": peft.__version__, "bitsandbytes": bitsandbytes.__version__, "lorakit": lk.__version__}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def run_checks(device: torch.device, sizes: Sizes) -> dict:
    results = {}
    for name, check in CHECKS.items():
        start = time.perf_counter()
        try:
            results[name] = check(device, sizes)
        except Exception as err:  # a failing check is reported with the rest, never hides them
            results[name] = {"ok": False, "error": f"{type(err).__name__}: {err}",
                             "traceback": traceback.format_exc(limit=4)}
        results[name]["seconds"] = round(time.perf_counter() - start, 2)
        print(f"check {name}: {'ok' if results[name]['ok'] else 'FAILED'} "
              f"({results[name]['seconds']} s)", file=sys.stderr, flush=True)
    return results


def run_measurements(device: torch.device, sizes: Sizes, deadline: float) -> dict:
    """Each section in turn until `deadline` (time.monotonic()); the alarm stops one that runs past it."""
    results = {}
    for name, measure in MEASUREMENTS.items():
        left = deadline - time.monotonic()
        if left < 1:
            results[name] = {"skipped": "time budget spent"}
            continue
        rows: list[dict] = []
        signal.setitimer(signal.ITIMER_REAL, left)
        start = time.perf_counter()
        try:
            results[name] = {"rows": rows, **measure(device, sizes, rows)}
        except OverBudget:
            results[name] = {"rows": rows, "stopped": "time budget spent during this section"}
        except Exception as err:
            results[name] = {"rows": rows, "error": f"{type(err).__name__}: {err}",
                             "traceback": traceback.format_exc(limit=4)}
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        results[name]["seconds"] = round(time.perf_counter() - start, 2)
        print(f"measured {name} ({results[name]['seconds']} s)", file=sys.stderr, flush=True)
        _fresh_peak(device)
    return results


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"
    return "" if value is None else str(value)


def _detail(check: dict) -> str:
    """Errors in scientific notation, byte comparisons by shape, or what went wrong."""
    if "error" in check:
        return check["error"][:100]
    parts = [f"{k} {v:.1e}" for k, v in check.items() if "error" in k or k == "adapter_effect"]
    parts += [f"{k}: {'identical' if v['identical'] else v}" for k, v in check.items() if isinstance(v, dict)]
    return "; ".join(parts)


def report(result: dict) -> None:
    env = result["environment"]
    print(f"# bench/gpu_check.py on {env['date']}: {env.get('gpu', env['device'])}, torch {env['torch']} "
          f"(CUDA {env['cuda']}), transformers {env['transformers']}, peft {env['peft']}, bitsandbytes "
          f"{env['bitsandbytes']}; {'tiny shapes' if result['tiny'] else 'full shapes'}, "
          f"{result['elapsed_s']:.0f} s of a {result['budget_s']:.0f} s budget")
    print("\nChecks")
    table([[name, "ok" if r["ok"] else "FAILED", _detail(r)] for name, r in result["checks"].items()],
          ["check", "result", "detail"])
    for name, section in result["measurements"].items():
        summary = ", ".join(f"{k} {_cell(v)}" for k, v in section.items() if k not in ("rows", "traceback"))
        print(f"\n{name}: {summary}")
        if section.get("rows"):
            columns = list(dict.fromkeys(k for row in section["rows"] for k in row))
            table([[_cell(row.get(c)) for c in columns] for row in section["rows"]], columns)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes: every part in seconds (for the CPU test)")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds for the whole run; measurements "
                        "stop when it is spent and the report still prints")
    parser.add_argument("--out", type=Path, default=None, help="JSON file (default $OUT/gpu_check.json if $OUT is set)")
    args = parser.parse_args()
    if args.device is None and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here. This script is for a GPU machine; to run every part on tiny shapes "
              "on the CPU instead, pass --device cpu --tiny", file=sys.stderr)
        return NO_CUDA
    device = torch.device(args.device or "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"gpu_check: --device {args.device} but torch {torch.__version__} sees no CUDA device", file=sys.stderr)
        return NO_CUDA
    started = time.monotonic()
    sizes = TINY if args.tiny else FULL
    if args.tiny and device.type == "cpu":
        torch.set_num_threads(1)  # tiny ops gain nothing from threads, and lose much on a shared machine
    signal.signal(signal.SIGALRM, _on_alarm)
    result = {"environment": _environment(device), "tiny": args.tiny, "budget_s": args.budget}
    result["checks"] = run_checks(device, sizes)
    result["measurements"] = run_measurements(device, sizes, started + args.budget)
    result["elapsed_s"] = time.monotonic() - started
    report(result)
    out = args.out or (Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else None)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"\nwrote {out}")
    return 0 if all(r["ok"] for r in result["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
