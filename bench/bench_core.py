"""GPT-2 small (124M, random init), fp32, 2 threads: lorakit vs PEFT on the same adapters, against the
frozen-base floor and full fine-tuning, so every overhead is read as a ratio measured in one run.

Training (batch 4 x 128, AdamW): the floor is forward + backward to the input embeddings with every weight
frozen, the least any adapter method can cost. Settings, each for lorakit and PEFT: r=8 on c_attn with
dropout 0 and 0.1, r=8 and r=64 on every linear layer but the head, and DoRA r=8 on c_attn.
Inference (128 tokens, batch 1 and 8): base, lorakit unmerged and merged, PEFT unmerged, and unmerged DoRA
for both libraries. Every adapter gets B ~ N(0, 0.01) so its forward does real work in both libraries.
Run: python bench/bench_core.py [--only 'train_*dora' 'infer_*_b1'] [--repeats N] [--rounds N]
For ratios of a few percent on a noisy host: python bench/bench_core.py --interleaved --only train_floor
'train_*_all' --repeats 12 (training configurations in one process, one step of each per round, ratios per
round; memory needs the default mode, one process per configuration).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from typing import TYPE_CHECKING

import torch
from harness import machine, main, round_robin, select, table, time_median
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

import lorakit as lk

if TYPE_CHECKING:
    import peft

SEQ, BATCH, VOCAB = 128, 4, 50257
LIBRARIES = ("lorakit", "peft")


@dataclass(frozen=True)
class Setting:
    """One adapter configuration, built identically in both libraries (alpha = 2r)."""

    label: str
    r: int = 8
    targets: str | tuple[str, ...] = ("c_attn",)
    dropout: float = 0.0
    dora: bool = False

    def lorakit(self) -> lk.LoraConfig:
        return lk.LoraConfig(r=self.r, alpha=2 * self.r, dropout=self.dropout, use_dora=self.dora,
                             target_modules=_targets(self.targets))

    def peft(self) -> peft.LoraConfig:
        import peft  # here, not at the top: lorakit's processes must not pay for PEFT's imports in their RSS

        return peft.LoraConfig(r=self.r, lora_alpha=2 * self.r, lora_dropout=self.dropout, use_dora=self.dora,
                               target_modules=_targets(self.targets))


SETTINGS = {
    "attn": Setting("r=8 c_attn"),
    "attn_drop": Setting("r=8 c_attn, dropout 0.1", dropout=0.1),
    "all": Setting("r=8 all linear", targets="all-linear"),
    "all_r64": Setting("r=64 all linear", r=64, targets="all-linear"),
    "dora": Setting("DoRA r=8 c_attn", dora=True),
}
INFER_KINDS = {"base": None, "lorakit": "attn", "lorakit_merged": "attn", "peft": "attn",
               "lorakit_dora": "dora", "peft_dora": "dora"}
TRAIN = ["train_floor", "train_full"] + [f"train_{lib}_{s}" for s in SETTINGS for lib in LIBRARIES]
INFER = [f"infer_{kind}_b{b}" for b in (1, 8) for kind in INFER_KINDS]


def _targets(targets: str | tuple[str, ...]) -> str | list[str]:
    return targets if isinstance(targets, str) else list(targets)


def _model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config())


def _ids(rows: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, SEQ), generator=torch.Generator().manual_seed(2))


def _adapt(model: GPT2LMHeadModel, library: str, setting: Setting) -> nn.Module:
    """Inject `setting` with `library`, then draw B ~ N(0, 0.01) from the same seed in both libraries."""
    if library == "lorakit":
        lk.inject(model, setting.lorakit())
    else:
        import peft

        model = peft.get_peft_model(model, setting.peft())
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.normal_(std=0.01)
    return model


def run(config: str, args: argparse.Namespace) -> dict:
    phase, rest = config.split("_", 1)
    return _train(rest, args) if phase == "train" else _infer(rest, args)


def _infer(config: str, args: argparse.Namespace) -> dict:
    kind, batch = config.rsplit("_b", 1)
    model = _model()
    if INFER_KINDS[kind]:
        model = _adapt(model, kind.split("_")[0], SETTINGS[INFER_KINDS[kind]])
    if kind == "lorakit_merged":
        lk.merge(model)
    model.eval()
    ids = _ids(int(batch))

    def step() -> None:
        with torch.inference_mode():
            model(ids)

    return {"seconds": time_median(step, warmup=2, repeats=args.repeats)}


def _train(config: str, args: argparse.Namespace) -> dict:
    step, trainable = _training_step(config)
    return {"seconds": time_median(step, warmup=2, repeats=args.repeats), "trainable": trainable}


def _training_step(config: str) -> tuple[Callable[[], None], int]:
    """One optimizer step of `config` (floor, full or a library_setting) on its own model, and its trainables."""
    model = _model().train()
    ids = _ids(BATCH)
    if config == "floor":
        model.requires_grad_(False)
        embed = model.transformer.wte

        def floor_step() -> None:
            inputs = embed(ids).detach().requires_grad_()
            model(inputs_embeds=inputs, labels=ids).loss.backward()

        return floor_step, 0
    if config != "full":
        library, setting = config.split("_", 1)
        model = _adapt(model, library, SETTINGS[setting])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in params)


def interleaved(args: argparse.Namespace) -> None:
    """The training configurations in this one process, one step of each in turn (the order rotating every
    round), so the host's drift hits all alike; ratios are medians of the per-round ratios. No memory figures:
    the models share the process (the default mode measures those)."""
    torch.set_num_threads(2)
    names = [name.removeprefix("train_") for name in select(TRAIN, args.only)]
    if "floor" not in names:
        sys.exit("--interleaved needs train_floor among the configurations: every ratio is taken against it")
    built = {name: _training_step(name) for name in names}
    times = round_robin({name: step for name, (step, _) in built.items()}, args.repeats)
    print(f"# bench/bench_core.py --interleaved on {date.today()} ({machine()}); 1-min load average "
          f"{os.getloadavg()[0]:.1f} at the end; {args.repeats} rounds, one step of each configuration per round")

    def per_round(name: str, against: str) -> list[float]:
        return [t / u for t, u in zip(times[name], times[against])]

    rows = []
    for name in names:
        floor = per_round(name, "floor")
        twin = name.replace("lorakit_", "peft_")
        has_twin = name.startswith("lorakit_") and twin in names
        peft = f"{statistics.median(per_round(name, twin)):.3f}" if has_twin else ""
        rows.append([name, f"{built[name][1]:,}", f"{1e3 * statistics.median(times[name]):.0f}",
                     f"{statistics.median(floor):.3f}", f"{min(floor):.3f}-{max(floor):.3f}", peft])
    table(rows, ["config", "trainable", "step ms (median)", "x floor (median of rounds)", "x floor range",
                 "lorakit / PEFT (median of rounds)"])


def _ratio(results: dict[str, dict], numerator: str, denominator: str) -> str:
    if numerator in results and denominator in results:
        return f"{results[numerator]['seconds'] / results[denominator]['seconds']:.3f}"
    return "-"


def _twins(name: str) -> tuple[str | None, str | None]:
    """The same run in PEFT (for an unmerged lorakit run) and the same library's LoRA run (for a DoRA run)."""
    peft = name.replace("_lorakit_", "_peft_") if "_lorakit_" in name and "merged" not in name else None
    lora = None
    if name.endswith("_dora"):
        lora = name.removesuffix("_dora") + "_attn"
    elif "_dora_b" in name:
        lora = name.replace("_dora_b", "_b")
    return peft, lora


def _comparisons(results: dict[str, dict], name: str, baseline: str) -> list[str]:
    """x baseline, lorakit / PEFT, DoRA / LoRA, peak RSS: the columns both tables share."""
    peft, lora = _twins(name)
    return [_ratio(results, name, baseline), _ratio(results, name, peft) if peft else "",
            _ratio(results, name, lora) if lora else "",
            f"{results[name]['peak_rss_mb']:,.0f}"]


def _report_training(results: dict[str, dict]) -> None:
    rows = []
    for name in (n for n in TRAIN if n in results):
        setting = SETTINGS.get(name.split("_", 2)[-1])
        rows.append([name.removeprefix("train_"), setting.label if setting else "",
                     f"{results[name]['trainable']:,}", f"{results[name]['seconds'] * 1000:.0f}",
                     *_comparisons(results, name, "train_floor")])
    if rows:
        print("\nTraining step (GPT-2 small, 4 x 128, AdamW, fp32)")
        table(rows, ["config", "setting", "trainable", "step ms", "x floor", "lorakit / PEFT", "DoRA / LoRA",
                     "peak RSS MB"])


def _report_inference(results: dict[str, dict]) -> None:
    rows = []
    for name in (n for n in INFER if n in results):
        kind, batch = name.removeprefix("infer_").rsplit("_b", 1)
        rows.append([kind, batch, f"{results[name]['seconds'] * 1000:.1f}",
                     *_comparisons(results, name, f"infer_base_b{batch}")])
    if rows:
        print("\nInference forward (128 tokens; lorakit, PEFT and DoRA rows unmerged)")
        table(rows, ["config", "batch", "ms", "x base", "lorakit / PEFT", "DoRA / LoRA", "peak RSS MB"])


def _mismatched(results: dict[str, dict]) -> list[str]:
    """Settings where the two libraries train different parameter counts, i.e. adapt different layers."""
    pairs = [(results.get(f"train_lorakit_{s}"), results.get(f"train_peft_{s}"), s) for s in SETTINGS]
    return [s for ours, theirs, s in pairs if ours and theirs and ours["trainable"] != theirs["trainable"]]


def report(results: dict[str, dict]) -> None:
    _report_training(results)
    _report_inference(results)
    mismatched = _mismatched(results)
    if mismatched:
        sys.exit(f"lorakit and PEFT train different parameter counts in {mismatched}: they adapt different layers")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--interleaved", action="store_true", help="training configurations in one process, step "
                        "by step in turn, ratios per round (for ratios of a few percent; no memory figures)")


if __name__ == "__main__":
    if "--interleaved" in sys.argv:
        parser = argparse.ArgumentParser()
        parser.add_argument("--only", nargs="*", default=None)
        add_arguments(parser)
        interleaved(parser.parse_args())
    else:
        main(TRAIN + INFER, run, report, add_arguments)
