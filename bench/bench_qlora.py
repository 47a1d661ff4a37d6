"""QLoRA training step on a Llama-style model (~110M parameters, random init), each configuration in its
own process: lorakit LoRA on a 16-bit (bf16) base; lorakit QLoRA (NF4 base, bf16 compute) with the
compiled dequantize (the default), with the eager one (`_eager`), and with the compiled one plus
`keep_dequantized` (`_keep`: one dequantize per layer and step instead of two); and PEFT on a
bitsandbytes NF4 base. Batch 4 x 128, LoRA r=16 on every linear layer, AdamW, 2 threads.
Reports median step time, model memory (parameters + buffers), peak RSS and the compile seconds each
QLoRA process paid on its first step (Inductor's on-disk cache makes later processes cheaper).
Run: python bench/bench_qlora.py --rounds 3
"""

from __future__ import annotations

import argparse
import time

import torch
from harness import main, table, time_median
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit as lk

CONFIGS = ["lorakit_lora16", "lorakit_qlora", "lorakit_qlora_eager", "lorakit_qlora_keep", "peft_bnb_qlora"]


def _model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                         num_key_value_heads=12, vocab_size=16000, tie_word_embeddings=False)
    return LlamaForCausalLM(config).to(torch.bfloat16)


def _model_bytes(model: nn.Module) -> int:
    tensors = {t.data_ptr(): t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]}
    return sum(tensors.values())


def _bnb_quantize(model: nn.Module, device: torch.device | str = "cpu") -> None:
    """bitsandbytes' Linear4bit for every linear but the head; it quantizes when moved to `device`."""
    import bitsandbytes as bnb

    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name != "lm_head":
            layer = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                      compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True)
            layer.load_state_dict(module.state_dict())
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer.to(device))


def run(config: str, args: argparse.Namespace) -> dict:
    model = _model()
    dense_bytes = _model_bytes(model)
    layers = None
    if config.startswith("lorakit_qlora"):
        lk.quantize_model(model, "nf4", compute_dtype=torch.bfloat16)
        report_ = lk.quantization_report(model)
        layers = report_.quantized_bytes / report_.dense_bytes
        lk.quant.compiled.set_enabled(config != "lorakit_qlora_eager")
    if config == "peft_bnb_qlora":
        import peft

        _bnb_quantize(model)
        model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    else:
        lk.inject(model, lk.LoraConfig(r=16, alpha=32, target_modules="all-linear"))
    if config == "lorakit_qlora_keep":
        lk.quant.keep_dequantized(model)
    ids = torch.randint(0, 16000, (4, 128))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        with torch.autocast("cpu", torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    model.train()
    start = time.perf_counter()
    step()  # the first step pays any compile
    first = time.perf_counter() - start
    seconds = time_median(step, warmup=1, repeats=args.repeats)
    compile_s = sum(lk.quant.compiled.compile_seconds().values())
    return {"seconds": seconds, "model_mb": _model_bytes(model) / 2**20, "dense_mb": dense_bytes / 2**20,
            "quantized_layers_ratio": layers, "first_step_s": first, "compile_s": compile_s,
            "compile_failed": lk.quant.compiled.failure()}


def report(results: dict[str, dict]) -> None:
    base = results.get("lorakit_lora16", {})
    rows = []
    for name in CONFIGS:
        if name in results:
            r = results[name]
            rows.append([name, f"{r['seconds'] * 1000:.0f}",
                         f"{r['seconds'] / base['seconds']:.2f}" if base else "-",
                         f"{r['model_mb']:.0f}", f"{r['model_mb'] / base['model_mb']:.2f}" if base else "-",
                         f"{r['peak_rss_mb']:,.0f}", f"{r['first_step_s']:.1f}", f"{r['compile_s']:.1f}"])
    print("\nQLoRA training step (Llama-style ~110M, bf16 compute, 4 x 128, r=16 all-linear, AdamW)")
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
        print(f"quantized linear layers: {ratio:.3f}x their bf16 bytes ({16 * ratio:.2f} bits per parameter); "
              "embeddings and output head stay in bf16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeats", type=int, default=5)


if __name__ == "__main__":
    main(CONFIGS, run, report, add_arguments)
