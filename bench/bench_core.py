"""GPT-2 small (124M, random init), batch 4 x 128, AdamW, fp32, 2 threads: lorakit vs PEFT vs full vs floor.

Training: median step time and peak RSS for lorakit r=8 on c_attn, PEFT with the same config, full
fine-tuning, and the frozen-base floor (forward + backward to the input embeddings only).
Inference (batch 1 and 8, 128 tokens): base, lorakit unmerged, lorakit merged, PEFT unmerged.
Run: python bench/bench_core.py   (each configuration in its own process)
"""

from __future__ import annotations

import argparse

import torch
from harness import main, table, time_median
from transformers import GPT2Config, GPT2LMHeadModel

import lorakit as lk

SEQ, BATCH = 128, 4
TRAIN = ["floor", "lorakit", "peft", "full"]
INFER = [f"{kind}_b{b}" for b in (1, 8) for kind in ("base", "lorakit", "lorakit_merged", "peft")]


def _model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config())


def _adapt(model: GPT2LMHeadModel, kind: str):
    if kind.startswith("lorakit"):
        lk.inject(model, lk.LoraConfig(r=8, alpha=16, target_modules=["c_attn"]))
        for _, layer in model.named_modules():
            if isinstance(layer, lk.layers.LoraLayer):
                torch.nn.init.normal_(layer.lora_B["default"], std=0.01)
        if kind == "lorakit_merged":
            lk.merge(model)
    elif kind == "peft":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn"]))
    return model


def run(config: str, args: argparse.Namespace) -> dict:
    model = _model()
    if config in TRAIN:
        return _train(model, config, args)
    kind, batch = config.rsplit("_b", 1)
    model = _adapt(model, kind).eval()
    ids = torch.randint(0, 50257, (int(batch), SEQ))

    def step():
        with torch.inference_mode():
            model(ids)

    return {"seconds": time_median(step, warmup=2, repeats=args.repeats)}


def _train(model, config: str, args: argparse.Namespace) -> dict:
    ids = torch.randint(0, 50257, (BATCH, SEQ))
    model.train()
    if config == "floor":
        model.requires_grad_(False)
        embed = model.transformer.wte

        def step():
            inputs = embed(ids).detach().requires_grad_()
            model(inputs_embeds=inputs, labels=ids).loss.backward()

        trainable = 0
    else:
        model = _adapt(model, config) if config != "full" else model
        params = [p for p in model.parameters() if p.requires_grad]
        trainable = sum(p.numel() for p in params)
        opt = torch.optim.AdamW(params, lr=1e-4)

        def step():
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    return {"seconds": time_median(step, warmup=2, repeats=args.repeats), "trainable": trainable}


def report(results: dict[str, dict]) -> None:
    floor = results.get("floor", {}).get("seconds")
    rows = []
    for name in TRAIN:
        if name in results:
            r = results[name]
            rows.append([name, f"{r['trainable']:,}", f"{r['seconds'] * 1000:.0f}",
                         f"{r['seconds'] / floor:.3f}" if floor else "-", f"{r['peak_rss_mb']:,.0f}"])
    print("\nTraining step (GPT-2 small, 4 x 128, AdamW, fp32)")
    table(rows, ["config", "trainable", "step ms", "x floor", "peak RSS MB"])
    if "lorakit" in results and "peft" in results:
        print(f"lorakit / PEFT step: {results['lorakit']['seconds'] / results['peft']['seconds']:.3f}")
    rows = []
    for batch in (1, 8):
        base = results.get(f"base_b{batch}", {}).get("seconds")
        for kind in ("base", "lorakit", "lorakit_merged", "peft"):
            r = results.get(f"{kind}_b{batch}")
            if r:
                rows.append([kind, batch, f"{r['seconds'] * 1000:.1f}", f"{r['seconds'] / base:.3f}" if base else "-"])
    print("\nInference forward (128 tokens)")
    table(rows, ["config", "batch", "ms", "x base"])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeats", type=int, default=7)


if __name__ == "__main__":
    main(TRAIN + INFER, run, report, add_arguments)
