"""QLoRA training step on a Llama-style model (~110M parameters, random init), each configuration in its
own process: lorakit LoRA on a dense base; lorakit QLoRA (NF4 base) as it is by
default, with `keep_dequantized` (`_keep`: one dequantize per layer and step instead of two), and with
the opt-in compiled dequantize (`_compiled`); and PEFT on a bitsandbytes NF4 base. Batch 4 x 128, LoRA r=16 on every linear layer, AdamW, 2 threads.
Base and compute dtype follow --dtype: bfloat16 (with autocast) where the CPU has it natively, else float32.
Reports median step time, model memory (parameters + buffers), peak RSS and the compile seconds each
QLoRA process paid on its first step (Inductor's on-disk cache makes later processes cheaper).
Run: python bench/bench_qlora.py --rounds 3   (quiet machine; one process per configuration)
     python bench/bench_qlora.py --interleaved --repeats 5   (loaded machine: one process, steps in turn)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from datetime import date

import torch
from harness import add_dtype_argument, compute_dtype, machine, main, round_robin, table, time_median
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit as lk

CONFIGS = ["lorakit_lora16", "lorakit_qlora", "lorakit_qlora_keep", "lorakit_qlora_compiled", "peft_bnb_qlora"]


def _model(dtype: torch.dtype) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                         num_key_value_heads=12, vocab_size=16000, tie_word_embeddings=False)
    return LlamaForCausalLM(config).to(dtype)


def _model_bytes(model: nn.Module) -> int:
    tensors = {t.data_ptr(): t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]}
    return sum(tensors.values())


def _bnb_quantize(model: nn.Module, device: torch.device | str = "cpu",
                  compute_dtype: torch.dtype = torch.bfloat16) -> None:
    """bitsandbytes' Linear4bit for every linear but the head; it quantizes when moved to `device`."""
    import bitsandbytes as bnb

    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name != "lm_head":
            layer = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                      compute_dtype=compute_dtype, quant_type="nf4", compress_statistics=True)
            layer.load_state_dict(module.state_dict())
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer.to(device))


def _build(config: str, dtype: torch.dtype) -> tuple[nn.Module, Callable[[], None], float | None, int]:
    """The configuration's model, one training step on it, the quantized layers' byte ratio and dense bytes."""
    model = _model(dtype)
    dense_bytes = _model_bytes(model)
    layers = None
    if config.startswith("lorakit_qlora"):
        lk.quantize_model(model, "nf4", compute_dtype=dtype)
        report_ = lk.quantization_report(model)
        layers = report_.quantized_bytes / report_.dense_bytes
    if config == "peft_bnb_qlora":
        import peft

        _bnb_quantize(model, compute_dtype=dtype)
        model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    else:
        lk.inject(model, lk.LoraConfig(r=16, alpha=32, target_modules="all-linear"))
    model.train()
    ids = torch.randint(0, 16000, (4, 128))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        with torch.autocast("cpu", torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return model, step, layers, dense_bytes


def _set_variant(config: str, model: nn.Module) -> None:
    """The lorakit QLoRA variants differ only in two switches, set before each step."""
    if config.startswith("lorakit_qlora"):
        lk.quant.compiled.set_enabled(config == "lorakit_qlora_compiled")
        lk.quant.keep_dequantized(model, None if config == "lorakit_qlora_keep" else 0)


def run(config: str, args: argparse.Namespace) -> dict:
    dtype = compute_dtype(args.dtype)
    model, step, layers, dense_bytes = _build(config, dtype)
    _set_variant(config, model)
    start = time.perf_counter()
    step()  # the first step pays any compile
    first = time.perf_counter() - start
    seconds = time_median(step, warmup=1, repeats=args.repeats)
    compile_s = sum(lk.quant.compiled.compile_seconds().values())
    return {"seconds": seconds, "model_mb": _model_bytes(model) / 2**20, "dense_mb": dense_bytes / 2**20,
            "quantized_layers_ratio": layers, "first_step_s": first, "compile_s": compile_s,
            "compile_failed": lk.quant.compiled.failure(), "dtype": str(dtype).removeprefix("torch.")}


def interleaved(args: argparse.Namespace) -> None:
    """Every configuration in this one process, one step of each in turn (the order rotating every round), so a
    loaded machine's drift hits all alike (no per-configuration memory figures: the models share the process)."""
    torch.set_num_threads(2)
    dtype = compute_dtype(args.dtype)
    built = {name: _build(name, dtype) for name in ("lorakit_lora16", "lorakit_qlora", "peft_bnb_qlora")}
    setups = {name: built["lorakit_qlora" if name.startswith("lorakit_qlora") else name] for name in CONFIGS}

    def variant_step(name: str) -> Callable[[], None]:
        model, step = setups[name][:2]

        def run_variant() -> None:
            _set_variant(name, model)
            step()

        return run_variant

    # the untimed first round pays the compile
    times = round_robin({name: variant_step(name) for name in CONFIGS}, args.repeats)
    print(f"# bench/bench_qlora.py --interleaved on {date.today()} ({machine()}); 1-min load average "
          f"{os.getloadavg()[0]:.1f} at the end; {dtype}; median of {args.repeats} steps each, taken in turn; "
          f"compile seconds {lk.quant.compiled.compile_seconds()}")
    median = {name: statistics.median(t) for name, t in times.items()}
    table([[name, f"{median[name] * 1000:.0f}", f"{median[name] / median['lorakit_lora16']:.2f}",
            f"{median[name] / median['peft_bnb_qlora']:.2f}", f"{min(times[name]) * 1000:.0f}-"
            f"{max(times[name]) * 1000:.0f}"] for name in CONFIGS],
          ["config", "step ms", "x lora16 step", "x PEFT+bnb step", "range ms"])


def report(results: dict[str, dict]) -> None:
    base = results.get("lorakit_lora16", {})
    dtype = next(iter(results.values()))["dtype"]
    rows = []
    for name in CONFIGS:
        if name in results:
            r = results[name]
            rows.append([name, f"{r['seconds'] * 1000:.0f}",
                         f"{r['seconds'] / base['seconds']:.2f}" if base else "-",
                         f"{r['model_mb']:.0f}", f"{r['model_mb'] / base['model_mb']:.2f}" if base else "-",
                         f"{r['peak_rss_mb']:,.0f}", f"{r['first_step_s']:.1f}", f"{r['compile_s']:.1f}"])
    print(f"\nQLoRA training step (Llama-style ~110M, {dtype} compute, 4 x 128, r=16 all-linear, AdamW)")
    table(rows, ["config", "step ms", "x lora16 step", "model MB", "x lora16 model", "peak RSS MB", "first step s",
                 "compile s"])
    for name in CONFIGS[1:4]:
        if name in results and "peft_bnb_qlora" in results:
            ratio = results[name]["seconds"] / results["peft_bnb_qlora"]["seconds"]
            print(f"{name} / PEFT+bitsandbytes QLoRA step: {ratio:.2f}")
        if results.get(name, {}).get("compile_failed"):
            print(f"{name}: compile failed, eager kernels used ({results[name]['compile_failed']})")
    if results.get("lorakit_qlora", {}).get("quantized_layers_ratio"):
        ratio = results["lorakit_qlora"]["quantized_layers_ratio"]
        bits = torch.finfo(getattr(torch, dtype)).bits
        print(f"quantized linear layers: {ratio:.3f}x their {dtype} bytes ({bits * ratio:.2f} bits per parameter); "
              f"embeddings and output head stay in {dtype}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--interleaved", action="store_true", help="all configurations in one process, step by "
                        "step in turn (for a loaded machine; no memory figures)")
    add_dtype_argument(parser)


if __name__ == "__main__":
    if "--interleaved" in sys.argv:
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        interleaved(parser.parse_args())
    else:
        main(CONFIGS, run, report, add_arguments)
