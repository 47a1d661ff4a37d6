"""Mixed-adapter batches on GPT-2 small (random init, fp32, 2 threads, torch.inference_mode): one forward in
which every row uses its own adapter. A server batches requests for many adapters of one base, so what
matters is the cost over the base model alone, compared with PEFT's adapter_names (which loops over adapters).

Shapes:
  prefill   8 rows x 64 tokens, 8 adapters (one per row), r=8 on c_attn
  decode64  64 rows x 1 token on a filled 256-token static KV cache, 64 adapters, r=16 on every linear layer
            but the head (c_attn, attn c_proj, c_fc, mlp c_proj)
  decode8   the same with 8 adapters, rows cycling through them
Configurations per shape: the base model alone; PEFT `model(..., adapter_names=rows)`; lorakit
`with lk.route(model, rows, strategy=...): model(...)` with strategy "auto", "gather" (padded batched matmuls)
and "group" (a pass per adapter), each reported missing while lk.route has no `strategy` keyword, with routing
set up inside the timed call, as PEFT's adapter_names is; and "held": one lk.route block ("auto") around all
the timed steps, as one wraps a generate call, so the gathered weights are reused step after step. Decode times only the one-token step: the static
cache is rewound after each step, so every step writes and attends over the same 257 slots. Every row's cache
holds the same 256-token prefix (the base model's): attention costs the same whatever the values, and filling
64 distinct rows would add a minute to every process.
Both libraries get the same adapters: lorakit creates them (B ~ N(0, 0.01)) and saves each with lk.save;
PEFT loads those folders. `<shape>_check` runs first and aborts unless every lorakit routing equals PEFT's
output within 1e-4 (and differs from the base model's, so the adapters are really applied).
Run: python bench/bench_route.py [--only 'decode64_*'] [--repeats N]
"""

from __future__ import annotations

import argparse
import copy
import inspect
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from harness import main, table, time_median
from torch import Tensor, nn
from transformers import GPT2Config, GPT2LMHeadModel, StaticCache

import lorakit as lk

VOCAB, TOLERANCE = 50257, 1e-4


@dataclass(frozen=True)
class Shape:
    """One batch shape and the adapters it mixes (alpha = 2r), so every configuration builds the same work."""

    rows: int
    tokens: int
    cache: int  # tokens already in the KV cache; 0 = no cache (prefill)
    adapters: int
    r: int
    targets: str | tuple[str, ...]
    repeats: int  # default timed calls: more for short steps, whose medians are noisier

    def names(self) -> list[str]:
        return [f"a{i}" for i in range(self.adapters)]

    def row_adapters(self) -> list[str]:
        return [f"a{i % self.adapters}" for i in range(self.rows)]

    def config(self) -> lk.LoraConfig:
        targets = self.targets if isinstance(self.targets, str) else list(self.targets)
        return lk.LoraConfig(r=self.r, alpha=2 * self.r, target_modules=targets)


SHAPES = {
    "prefill": Shape(rows=8, tokens=64, cache=0, adapters=8, r=8, targets=("c_attn",), repeats=7),
    "decode64": Shape(rows=64, tokens=1, cache=256, adapters=64, r=16, targets="all-linear", repeats=15),
    "decode8": Shape(rows=64, tokens=1, cache=256, adapters=8, r=16, targets="all-linear", repeats=15),
}
STRATEGIES = {"lorakit_auto": "auto", "lorakit_gather": "gather", "lorakit_group": "group"}
HELD = "lorakit_held"  # one lk.route block around every step, as around a generate call
METHODS = ["base", "peft", *STRATEGIES, HELD]
CONFIGS = [f"{shape}_{method}" for shape in SHAPES for method in ["check", *METHODS]]


def _model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config()).eval()


def _inputs(model: nn.Module, shape: Shape) -> dict:
    """Token ids for the shape, plus for decode a static cache holding a base-model prefix in every row."""
    generator, device = torch.Generator().manual_seed(1), next(model.parameters()).device
    ids = torch.randint(0, VOCAB, (shape.rows, shape.tokens), generator=generator).to(device)
    if not shape.cache:
        return {"input_ids": ids}
    cache = StaticCache(config=model.config, max_cache_len=shape.cache + shape.tokens)
    prefix = torch.randint(0, VOCAB, (1, shape.cache), generator=generator).to(device)
    with torch.inference_mode():
        model(prefix, past_key_values=cache, logits_to_keep=1)
    cache.reorder_cache(torch.zeros(shape.rows, dtype=torch.long, device=device))  # every row continues row 0's prefix
    return {"input_ids": ids, "past_key_values": cache}


@torch.inference_mode()
def _forward(model: nn.Module, inputs: dict, **kwargs) -> Tensor:
    """One forward; a static cache is rewound afterwards (it has no crop) so the next call repeats this one."""
    logits = model(**inputs, **kwargs).logits
    cache = inputs.get("past_key_values")
    if cache is not None:
        for layer in cache.layers:
            layer.cumulative_length.sub_(inputs["input_ids"].shape[1])
    return logits


def _add_adapters(model: nn.Module, shape: Shape) -> None:
    """The shape's adapters in lorakit, each with B ~ N(0, 0.01) so it changes the output."""
    names = shape.names()
    torch.manual_seed(2)
    lk.inject(model, shape.config(), adapter=names[0])
    for name in names[1:]:
        lk.add_adapter(model, name, shape.config())
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.normal_(std=0.01)


def _peft(model: nn.Module, shape: Shape, folder: Path) -> nn.Module:
    """PEFT on `model` (a plain base) with the adapters that `folder` holds, one subfolder each."""
    import peft

    names = shape.names()
    model = peft.PeftModel.from_pretrained(model, folder / names[0], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(folder / name, adapter_name=name)
    return model.eval()


def _save(model: nn.Module, shape: Shape, folder: Path) -> None:
    for name in shape.names():
        lk.save(model, folder / name, adapter=name)


def _has_strategy() -> bool:
    return "strategy" in inspect.signature(lk.route).parameters


def _routed(model: nn.Module, rows: list[str], strategy: str | None) -> Callable[[dict], Tensor]:
    """A forward under lk.route; strategy None calls it without the keyword (a lorakit that lacks it)."""
    options = {} if strategy is None else {"strategy": strategy}

    def call(inputs: dict) -> Tensor:
        with lk.route(model, rows, **options):
            return _forward(model, inputs)

    return call


def _check(shape: Shape) -> dict:
    """Every available lorakit routing must give PEFT's adapter_names output on this shape."""
    lorakit_model = _model()
    inputs = _inputs(lorakit_model, shape)
    peft_base = copy.deepcopy(lorakit_model)
    _add_adapters(lorakit_model, shape)
    with tempfile.TemporaryDirectory() as folder:
        _save(lorakit_model, shape, Path(folder))
        peft_model = _peft(peft_base, shape, Path(folder))
    rows = shape.row_adapters()
    expected = _forward(peft_model, inputs, adapter_names=rows)
    with lk.disabled(lorakit_model):
        base_gap = (_forward(lorakit_model, inputs) - expected).abs().max().item()
    if base_gap < 100 * TOLERANCE:
        raise SystemExit(f"adapters barely change the output (max {base_gap:.2e}); the check would prove nothing")
    strategies = STRATEGIES.values() if _has_strategy() else [None]
    errors = {str(s): (_routed(lorakit_model, rows, s)(inputs) - expected).abs().max().item() for s in strategies}
    bad = {s: e for s, e in errors.items() if e > TOLERANCE}
    if bad:
        raise SystemExit(f"lorakit's routed output differs from PEFT's adapter_names output: max abs error {bad}")
    return {"max_abs_error": errors, "adapter_effect": base_gap}


def run(config: str, args: argparse.Namespace) -> dict:
    shape_name, method = config.split("_", 1)
    shape = SHAPES[shape_name]
    if method == "check":
        return _check(shape)
    if method in (*STRATEGIES, HELD) and not _has_strategy():
        return {"missing": "lk.route has no strategy= keyword yet"}
    step = _step(method, shape)
    return {"seconds": time_median(step, warmup=2, repeats=args.repeats or shape.repeats)}


def _step(method: str, shape: Shape) -> Callable[[], Tensor]:
    """The timed call for one configuration, with its model and inputs built."""
    model = _model()
    inputs = _inputs(model, shape)
    if method == "base":
        return lambda: _forward(model, inputs)
    _add_adapters(model, shape)
    if method in STRATEGIES:
        call = _routed(model, shape.row_adapters(), STRATEGIES[method])
        return lambda: call(inputs)
    if method == HELD:
        lk.route(model, shape.row_adapters()).__enter__()  # held until the process ends
        return lambda: _forward(model, inputs)
    with tempfile.TemporaryDirectory() as folder:
        _save(model, shape, Path(folder))
        peft_model = _peft(lk.unload(model, merge=False), shape, Path(folder))
    rows = shape.row_adapters()
    return lambda: _forward(peft_model, inputs, adapter_names=rows)


def _row(results: dict[str, dict], shape_name: str, method: str) -> list[str]:
    shape, r = SHAPES[shape_name], results[f"{shape_name}_{method}"]
    if "missing" in r:
        return [method, "missing", "", "", ""]
    versus_peft = _ratio(results, f"{shape_name}_peft", f"{shape_name}_{method}") if "lorakit" in method else ""
    return [method, f"{r['seconds'] * 1000:.1f}", f"{shape.rows * shape.tokens / r['seconds']:,.0f}",
            _ratio(results, f"{shape_name}_{method}", f"{shape_name}_base"), versus_peft]


def _title(shape_name: str) -> str:
    shape = SHAPES[shape_name]
    targets = shape.targets if isinstance(shape.targets, str) else ", ".join(shape.targets)
    cache = f" on a {shape.cache}-token static KV cache" if shape.cache else ""
    tokens = f"{shape.tokens} token{'s' * (shape.tokens > 1)}"
    return f"{shape_name}: {shape.rows} rows x {tokens}{cache}, {shape.adapters} adapters, r={shape.r} on {targets}"


def report(results: dict[str, dict]) -> None:
    for shape_name in SHAPES:
        methods = [m for m in METHODS if f"{shape_name}_{m}" in results]
        check = results.get(f"{shape_name}_check")
        if not methods and not check:
            continue
        print(f"\n{_title(shape_name)}")
        if check:
            errors = ", ".join(f"{s} {e:.1e}" for s, e in check["max_abs_error"].items())
            print(f"check: lorakit vs PEFT logits max abs error: {errors} (adapters move them by up to "
                  f"{check['adapter_effect']:.3f})")
        if methods:
            table([_row(results, shape_name, m) for m in methods],
                  ["config", "ms / step", "tokens / s", "x base time", "lorakit / PEFT throughput"])


def _ratio(results: dict[str, dict], numerator: str, denominator: str) -> str:
    a, b = results.get(numerator, {}), results.get(denominator, {})
    return f"{a['seconds'] / b['seconds']:.3f}" if "seconds" in a and "seconds" in b else "-"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeats", type=int, default=None, help="timed calls (default: per shape, 7 or 15)")


if __name__ == "__main__":
    main(CONFIGS, run, report, add_arguments)
