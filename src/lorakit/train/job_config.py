"""The settings of `lorakit train`: a JobConfig holds the adapter's LoraConfig and the optimiser's
TrainSettings beside the job's own fields, and is built from flag names (`--batch-size`, a config file's
`batch_size:` or `batch-size:`), every value coerced and range-checked before anything loads.

`full_finetune` trains every weight of the model instead of an adapter (the baseline LoRA is measured
against); it has no adapter settings, and without `lr` it takes FULL_FINETUNE_LR, not the adapters' default.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any

from ..config import LoraConfig
from ..errors import LorakitError
from ..quant.codes import QUANT_TYPES
from ..quant.embedding import TABLE_TYPES
from .loop import TrainSettings

TASK_NAMES = ("causal-lm", "classification")  # what --task accepts

# Flag names of the adapter's settings -> LoraConfig fields.
LORA_FLAGS = {"r": "r", "alpha": "alpha", "dropout": "dropout", "target": "target_modules", "init": "init",
              "use_dora": "use_dora", "use_rslora": "use_rslora"}
TRAIN_FLAGS = {f.name: f.name for f in dataclasses.fields(TrainSettings)}
ALIASES = {"dora": "use_dora", "rslora": "use_rslora"}  # the CLI's --dora / --rslora
# Full fine-tuning moves every weight, so it needs a far smaller step than an adapter; picked for the
# embedded default by the learning-rate sweep of experiments/ (docs/experiments.md).
FULL_FINETUNE_LR = 3e-5
ADAPTER_ONLY = ("lora_plus_ratio",)  # optimiser settings that only mean something for an adapter


@dataclass
class JobConfig:
    """Every setting of `lorakit train`; build it from flag names with `JobConfig.of(...)`."""

    model: str = "default"
    data: str = "default"
    eval_data: str | None = None
    task: str | None = None
    out: str = "runs/train"
    quantize: str | None = None
    quantize_embeddings: str | None = None  # with quantize: the embeddings and head too (int8, nf4, fp4)
    max_length: int = 256
    eval_size: int | None = None
    resume: bool = False
    overwrite: bool = False
    dry_run: bool = False
    nproc: int = 1
    full_finetune: bool = False  # train every weight, no adapter; saves the whole model
    eval_before: bool = True  # evaluate the untrained model first (a study measures it once instead)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainSettings = field(default_factory=TrainSettings)

    def __post_init__(self) -> None:
        if self.task is not None and self.task not in TASK_NAMES:
            raise LorakitError(f"task must be one of {', '.join(TASK_NAMES)}, got {self.task!r}")
        if self.quantize is not None and self.quantize not in QUANT_TYPES:
            raise LorakitError(f"quantize must be one of {', '.join(QUANT_TYPES)}, got {self.quantize!r}")
        if self.quantize_embeddings is not None:
            if self.quantize_embeddings not in TABLE_TYPES:
                raise LorakitError(f"quantize_embeddings must be one of {', '.join(TABLE_TYPES)}, "
                                   f"got {self.quantize_embeddings!r}")
            if self.quantize is None:
                raise LorakitError("quantize_embeddings applies to a quantized base; add --quantize nf4")
        for name, low in (("max_length", 2), ("nproc", 1), ("eval_size", 1)):
            value = getattr(self, name)
            if value is not None and value < low:
                raise LorakitError(f"{name} must be >= {low}, got {value}")
        if self.resume and self.overwrite:
            raise LorakitError("resume continues the run in --out and overwrite deletes it; choose one")
        if self.full_finetune and self.quantize is not None:
            raise LorakitError("full fine-tuning trains the dense weights, which a quantized base does not have; "
                               "drop --quantize (QLoRA trains an adapter on a 4-bit base) or --full-finetune")

    @classmethod
    def of(cls, origin: str = "", **settings: Any) -> JobConfig:
        """A checked JobConfig from flag names; `origin` (e.g. "--config run.yaml") prefixes type errors."""
        job, lora, train = {}, {}, {}
        hints = setting_types()
        values = {}
        for key, value in settings.items():
            name = flag_name(key, origin)
            values[name] = coerce(name, value, hints[name], origin)
        if values.get("full_finetune"):
            values = _full_finetune_settings(values, origin)
        for name, value in values.items():
            if name in LORA_FLAGS:
                lora[LORA_FLAGS[name]] = value
            elif name in TRAIN_FLAGS:
                train[name] = value
            else:
                job[name] = value
        return cls(**job, lora=LoraConfig(**lora), train=TrainSettings(**train))

    def settings(self) -> dict[str, Any]:
        """Flag name -> value for every setting: what run.json records and `--resume` compares."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("lora", "train")}
        if not self.full_finetune:
            values |= {flag: getattr(self.lora, name) for flag, name in LORA_FLAGS.items()}
        return values | dataclasses.asdict(self.train)


def _full_finetune_settings(values: dict[str, Any], origin: str) -> dict[str, Any]:
    """Full fine-tuning's settings: adapter settings are refused (they would be ignored), and the learning
    rate defaults to FULL_FINETUNE_LR."""
    adapter = sorted(name for name in values if name in LORA_FLAGS or name in ADAPTER_ONLY)
    if adapter:
        where = f"{origin}: " if origin else ""
        shown = ", ".join("--" + name.replace("_", "-") for name in adapter)
        raise LorakitError(f"{where}{shown} set up an adapter, and full fine-tuning trains every weight without "
                           "one; drop them, or drop --full-finetune to train LoRA")
    return {"lr": FULL_FINETUNE_LR} | values


def flag_names() -> list[str]:
    return sorted(setting_types())


def flag_name(key: str, origin: str = "") -> str:
    """The setting a key names: `batch-size`, `batch_size` and the CLI's aliases all count."""
    name = str(key).replace("-", "_")
    name = ALIASES.get(name, name)
    if name not in setting_types():
        where = f"{origin}: " if origin else ""
        if name == "config":
            raise LorakitError(f"{where}a config file cannot name another one (config:); merge them into one file")
        raise LorakitError(f"{where}unknown setting {key!r}; known: {', '.join(flag_names())}")
    return name


def coerce(name: str, value: Any, hint: Any, origin: str = "") -> Any:
    """`value` as the type the setting needs; numbers written as strings (YAML reads `1e-3` as one) count."""
    options = typing.get_args(hint) or (hint,)
    if value is None and type(None) in options:
        return None
    where = f"{origin}: " if origin else ""
    if int in options and float not in options:
        number = _number(value)
        if number is None or not float(number).is_integer():
            raise LorakitError(f"{where}{name} must be an integer, got {value!r}")
        return int(number)
    if float in options:
        number = _number(value)
        if number is None or not math.isfinite(number):
            raise LorakitError(f"{where}{name} must be a finite number, got {value!r}")
        return number
    if bool in options:
        if not isinstance(value, bool):
            raise LorakitError(f"{where}{name} must be true or false, got {value!r}")
        return value
    if isinstance(value, str):
        return value
    if list[str] in options and isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    kind = "a string or a list of strings" if list[str] in options else "a string"
    raise LorakitError(f"{where}{name} must be {kind}, got {value!r}")


def _number(value: Any) -> float | int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            try:
                return float(value)
            except ValueError:
                return None
    return None


def setting_types() -> dict[str, Any]:
    """Flag name -> type of every setting (JobConfig's own fields, then the adapter's and the optimiser's)."""
    job = typing.get_type_hints(JobConfig)
    lora = typing.get_type_hints(LoraConfig)
    hints = {name: hint for name, hint in job.items() if name not in ("lora", "train")}
    hints |= {flag: lora[name] for flag, name in LORA_FLAGS.items()}
    return hints | typing.get_type_hints(TrainSettings)
