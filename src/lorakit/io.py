"""Adapter folders in PEFT's layout (read and written), and loralib checkpoints (read).

A folder holds `adapter_config.json` and `adapter_model.safetensors` with keys
`base_model.model.<module>.lora_A.weight` (r, in) / `.lora_B.weight` (out, r), `lora_embedding_A/B` for
embeddings, and whole modules_to_save parameters under their own names, so PEFT and vLLM read it as is.
Loading checks every tensor against the model before the model is changed.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor, nn

from . import atomic, pissa
from .version import __version__
from .config import LoraConfig
from .errors import FormatError, LorakitError
from .inject import adaptable_modules, attach, base_modules, name_matches
from .layers.core import AdapterSpec, LoraLayer
from .layers.embedding import Embedding
from .layers.registry import lora_class_for, planned_shapes
from .state import find_state, lora_layers, saved_modules

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
_FILE_SUFFIXES = {"lora_A.weight": "A", "lora_B.weight": "B", "lora_embedding_A": "A", "lora_embedding_B": "B",
                  "lora_magnitude_vector": "M"}
_TASK_MAPPINGS = {  # PEFT's task_type -> transformers' auto-class table of model classes
    "CAUSAL_LM": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "SEQ_CLS": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    "SEQ_2_SEQ_LM": "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
    "TOKEN_CLS": "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
    "QUESTION_ANS": "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES",
}


# ---- writing --------------------------------------------------------------------------------------------
def adapter_state_dict(model: nn.Module, adapter: str = "default", dtype: torch.dtype | None = None,
                       convert_pissa: bool = True) -> dict[str, Tensor]:
    """One adapter's tensors under PEFT's key names (adapter name stripped), in their own dtype unless asked.

    A PiSSA adapter comes as a plain LoRA pair of twice its rank against the original weights unless
    `convert_pissa=False` (see `save`).
    """
    out: dict[str, Tensor] = {}
    for name, layer in _layers_with(model, adapter):
        A, B = _file_pair(layer, adapter, convert_pissa)
        kind = "lora_embedding_{}" if isinstance(layer, Embedding) else "lora_{}.weight"
        out[f"{PREFIX}{name}.{kind.format('A')}"] = A
        out[f"{PREFIX}{name}.{kind.format('B')}"] = B
        if adapter in layer.lora_magnitude:
            out[f"{PREFIX}{name}.lora_magnitude_vector"] = layer.lora_magnitude[adapter]
    for name, wrapper in saved_modules(model):
        if adapter in wrapper.modules_to_save:
            for param_name, tensor in wrapper.modules_to_save[adapter].state_dict().items():
                out[f"{PREFIX}{name}.{param_name}"] = tensor
    return {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().contiguous()
            for k, v in out.items()}


def adapter_config(model: nn.Module, adapter: str = "default", convert_pissa: bool = True) -> dict[str, Any]:
    """adapter_config.json in PEFT's keys, describing exactly the layers the adapter holds (and, for a PiSSA
    adapter, the file `convert_pissa` chooses)."""
    layers = dict(_layers_with(model, adapter))
    shapes = {name: _file_rank_alpha(layer, adapter, convert_pissa) for name, layer in layers.items()}
    state = find_state(model)
    cfg = state.configs.get(adapter) if state else None
    if cfg is not None and pissa.is_pissa(cfg.init) and convert_pissa:
        cfg = pissa.lora_config(cfg)
    elif cfg is not None and pissa.is_pissa(cfg.init):
        _check_repeatable(cfg, adapter)
    if cfg is not None and all((cfg.rank_for(n), cfg.alpha_for(n)) == ra for n, ra in shapes.items()):
        r, alpha, rank_pattern, alpha_pattern = cfg.r, cfg.alpha, cfg.rank_pattern, cfg.alpha_pattern
    else:
        r, alpha, rank_pattern, alpha_pattern = _derived_patterns(shapes)
    spec = next(iter(layers.values())).lora_adapters[adapter]
    return {
        "peft_type": "LORA",
        "task_type": _task_type(model),
        "base_model_name_or_path": getattr(getattr(model, "config", None), "name_or_path", None) or None,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": spec.dropout,
        "target_modules": _compact_targets(model, sorted(layers)),
        "exclude_modules": None,
        "fan_in_fan_out": any(getattr(layer, "fan_in_fan_out", False) for layer in layers.values()),
        "bias": cfg.bias if cfg else "none",
        "use_rslora": spec.use_rslora,
        "use_dora": spec.use_dora,
        "modules_to_save": [n for n, w in saved_modules(model) if adapter in w.modules_to_save] or None,
        "init_lora_weights": {"kaiming": True}.get(cfg.init, cfg.init) if cfg else True,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "layers_to_transform": None,
        "layers_pattern": None,
        "inference_mode": True,
        "revision": None,
        "lorakit_version": __version__,
    }


def save(model: nn.Module, out_dir: str | os.PathLike, adapter: str | list[str] | None = "default",
         dtype: torch.dtype | None = None, convert_pissa: bool = True) -> Path:
    """Write adapter folders as PEFT does: one adapter into `out_dir`; None = all adapters, "default" at the
    top and every other one in a subfolder of its name. The folder is replaced as one unit (other files kept).

    A PiSSA adapter (init="pissa") is written as the whole change against the original weights: a plain
    LoRA pair of rank 2r ([A; A0], [B, -B0]) with alpha keeping the scaling and `init_lora_weights: true`,
    which any LoRA tool applies to the unmodified base. `convert_pissa=False` writes A and B as trained
    (rank r) with `init_lora_weights: "pissa"`: PEFT and lorakit then decompose the original base again when
    loading, so it too goes onto the unmodified base, at the cost of an SVD per layer (not possible for
    "pissa_niter_<k>", whose randomized SVD cannot be repeated).
    """
    out_dir = Path(out_dir)
    names = _adapter_names(model) if adapter is None else [adapter] if isinstance(adapter, str) else list(adapter)
    with atomic.atomic_folder(out_dir, keep_other_files=True) as staging:  # the folder changes as one unit
        for name in names:
            folder = staging if isinstance(adapter, str) or name == "default" else staging / name
            tensors = {k: v.cpu() for k, v in adapter_state_dict(model, name, dtype, convert_pissa).items()}
            config = adapter_config(model, name, convert_pissa)
            atomic.write_bytes(folder / WEIGHTS_NAME, save_safetensors(tensors, metadata={"format": "pt"}))
            atomic.write_text(folder / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out_dir


# ---- reading --------------------------------------------------------------------------------------------
@dataclass
class AdapterFile:
    """A parsed adapter folder: its config and tensors grouped by module."""

    folder: Path
    config: dict[str, Any]
    pairs: dict[str, dict[str, Tensor]] = field(default_factory=dict)  # module -> {"A": .., "B": ..}
    saved: dict[str, Tensor] = field(default_factory=dict)  # modules_to_save parameters, by full name


def read_adapter(folder: str | os.PathLike) -> AdapterFile:
    """Read and check a PEFT-layout folder on its own (no model needed); errors name the file and key."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FormatError(f"{folder}: no such adapter folder")
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise FormatError(f"{folder}: {CONFIG_NAME} is missing; is this an adapter folder written by lorakit or PEFT?")
    try:
        config = json.loads(config_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"{config_path}: not valid JSON ({exc}); the file is corrupt, save the adapter again") from None
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        found = config.get("peft_type") if isinstance(config, dict) else type(config).__name__
        raise FormatError(f"{config_path}: peft_type is {found!r}; lorakit reads LoRA adapters (peft_type 'LORA')")
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), (int, float)) or isinstance(config.get(key), bool):
            raise FormatError(f"{config_path}: {key!r} is missing or not a number")
    parsed = AdapterFile(folder, config)
    for key, tensor in _read_tensors(folder).items():
        if not key.startswith(PREFIX):
            raise FormatError(f"{folder / WEIGHTS_NAME}: key {key!r} does not start with {PREFIX!r} (not PEFT's layout)")
        module, kind = _split_key(key[len(PREFIX):])
        if kind is None:
            parsed.saved[key[len(PREFIX):]] = tensor
        else:
            parsed.pairs.setdefault(module, {})[kind] = tensor
    for module, pair in parsed.pairs.items():
        if not {"A", "B"} <= set(pair):
            missing = "lora_B" if "A" in pair else "lora_A"
            raise FormatError(f"{folder / WEIGHTS_NAME}: {module} has no {missing} tensor; the file is incomplete")
        if pair["A"].shape[0] != pair["B"].shape[1]:
            raise FormatError(
                f"{folder / WEIGHTS_NAME}: {module} lora_A is {tuple(pair['A'].shape)} but lora_B is "
                f"{tuple(pair['B'].shape)}; their ranks disagree"
            )
    if not parsed.pairs:
        raise FormatError(f"{folder / WEIGHTS_NAME}: holds no LoRA tensors")
    return parsed


def load(model: nn.Module, folder: str | os.PathLike, adapter: str = "default") -> nn.Module:
    """Load a lorakit or PEFT adapter folder into `model` (injecting layers when it has none).

    Every tensor is checked against the model first; on any mismatch the model is left untouched. A model
    without adapters gets this one active and trainable; otherwise it is added neither (as add_adapter).
    """
    file = read_adapter(folder)
    weights = file.folder / WEIGHTS_NAME
    modules = dict(base_modules(model))
    cfg = _config_from_file(file)
    specs: dict[str, AdapterSpec] = {}
    problems: list[str] = []
    for name, pair in sorted(file.pairs.items()):
        module = modules.get(name)
        if module is None or (not isinstance(module, LoraLayer) and lora_class_for(type(module)) is None):
            what = "has no module" if module is None else f"cannot adapt {type(module).__name__} at"
            problems.append(f"key {PREFIX}{name}.*: the model {what} {name!r}")
            continue
        rank = pair["A"].shape[0]
        spec = AdapterSpec(r=rank, alpha=cfg.alpha_for(name), dropout=cfg.dropout, use_rslora=cfg.use_rslora,
                           use_dora=cfg.use_dora or "M" in pair)
        expected = planned_shapes(module, spec)
        if spec.use_dora:
            expected = (*expected, (expected[1][0],))
            if "M" not in pair:
                problems.append(f"key {PREFIX}{name}.lora_magnitude_vector: missing, and the config says use_dora")
                continue
        for kind, want in zip("ABM", expected):
            if tuple(pair[kind].shape) != tuple(want):
                problems.append(f"key {PREFIX}{name} lora_{kind}: file has {tuple(pair[kind].shape)}, "
                                f"model expects {tuple(want)}")
        specs[name] = spec
    saved_targets = _check_saved(model, modules, file, cfg, problems)
    if problems:
        shown = "\n  ".join(problems[:12]) + (f"\n  ... {len(problems) - 12} more" if len(problems) > 12 else "")
        raise FormatError(f"{weights} does not fit this model (trained for another base?):\n  {shown}")
    attach(model, adapter, cfg, specs)
    with torch.no_grad():
        for name, pair in file.pairs.items():
            layer = model.get_submodule(name)
            layer.lora_A[adapter].copy_(pair["A"])
            layer.lora_B[adapter].copy_(pair["B"])
            if "M" in pair:
                layer.lora_magnitude[adapter].copy_(pair["M"])
        for key, (module_name, param_name) in saved_targets.items():
            wrapper = model.get_submodule(module_name)
            wrapper.modules_to_save[adapter].state_dict()[param_name].copy_(file.saved[key])
    return model


def load_loralib(model: nn.Module, path_or_state_dict: str | os.PathLike | dict[str, Tensor], alpha: float,
                 r: int | None = None, enable_lora: list[bool] | None = None, adapter: str = "default") -> nn.Module:
    """Load a loralib checkpoint (`<layer>.lora_A` / `.lora_B`, e.g. the published GPT-2 E2E adapters).

    loralib files do not store alpha, so it is required. A fused layer whose lora_B covers only part of
    its output (MergedLinear) needs `enable_lora`, e.g. [True, False, True] for GPT-2's c_attn with q and v.
    """
    state = path_or_state_dict if isinstance(path_or_state_dict, dict) else _torch_load(Path(path_or_state_dict))
    source = "state dict" if isinstance(path_or_state_dict, dict) else str(path_or_state_dict)
    pairs: dict[str, dict[str, Tensor]] = {}
    for key, tensor in state.items():
        key = key.removeprefix("module.")
        for kind in "AB":
            if key.endswith(f".lora_{kind}"):
                pairs.setdefault(key[: -len(".lora_A")], {})[kind] = tensor
    if not pairs:
        raise FormatError(f"{source}: no '*.lora_A' / '*.lora_B' keys; is this a loralib checkpoint?")
    modules = dict(base_modules(model))
    specs: dict[str, AdapterSpec] = {}
    for name, pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"} or name not in modules:
            raise FormatError(f"{source}: {name} " + ("has only one of lora_A / lora_B" if name in modules
                                                      else "is not a module of this model"))
        spec = _loralib_spec(name, modules[name], pair, alpha, r, enable_lora, source)
        expected = planned_shapes(modules[name], spec)
        if (tuple(pair["A"].shape), tuple(pair["B"].shape)) != tuple(map(tuple, expected)):
            raise FormatError(f"{source}: {name} has A {tuple(pair['A'].shape)} and B {tuple(pair['B'].shape)}, "
                              f"the model expects {tuple(expected[0])} and {tuple(expected[1])}")
        specs[name] = spec
    cfg = LoraConfig(r=next(iter(specs.values())).r, alpha=alpha, target_modules=sorted(specs))
    attach(model, adapter, cfg, specs)
    with torch.no_grad():
        for name, pair in pairs.items():
            layer = model.get_submodule(name)
            layer.lora_A[adapter].copy_(pair["A"])
            layer.lora_B[adapter].copy_(pair["B"])
    return model


# ---- helpers --------------------------------------------------------------------------------------------
def _layers_with(model: nn.Module, adapter: str) -> list[tuple[str, LoraLayer]]:
    layers = [(n, m) for n, m in lora_layers(model) if adapter in m.lora_adapters]
    if not layers:
        raise LorakitError(f"the model has no adapter named {adapter!r}; it has {_adapter_names(model)}")
    return layers


def _adapter_names(model: nn.Module) -> list[str]:
    state = find_state(model)
    if state is not None:
        return list(state.configs)
    return sorted({n for _, layer in lora_layers(model) for n in layer.lora_adapters})


def _file_pair(layer: LoraLayer, adapter: str, convert_pissa: bool) -> tuple[Tensor, Tensor]:
    """A and B as a plain LoRA pair; fused-part adapters become one block-structured pair (exact)."""
    spec = layer.lora_adapters[adapter]
    if convert_pissa and pissa.origin(layer, adapter) is not None:
        return pissa.lora_pair(layer, adapter)
    A, B = layer.lora_A[adapter], layer.lora_B[adapter]
    if spec.groups is None:
        return A, B
    per_part = B.shape[0] // spec.n_enabled
    full = B.new_zeros(per_part * len(spec.groups), A.shape[0])
    for j, part in enumerate(i for i, on in enumerate(spec.groups) if on):
        full[part * per_part:(part + 1) * per_part, j * spec.r:(j + 1) * spec.r] = B[j * per_part:(j + 1) * per_part]
    return A, full


def _check_repeatable(cfg: LoraConfig, adapter: str) -> None:
    """A file holding a PiSSA adapter's A and B as trained needs a loader to rebuild the same residual."""
    if cfg.init != "pissa":
        raise LorakitError(f"adapter {adapter!r} was started with init={cfg.init!r}, a randomized SVD that a loader "
                           "cannot repeat, so its trained A and B cannot be saved alone; save it converted "
                           "(convert_pissa=True, the default)")


def _file_rank_alpha(layer: LoraLayer, adapter: str, convert_pissa: bool) -> tuple[int, float]:
    """The rank in the file and the alpha that gives this layer's scaling at that rank."""
    spec = layer.lora_adapters[adapter]
    if convert_pissa and pissa.origin(layer, adapter) is not None:
        return pissa.lora_rank_alpha(spec)
    rank = spec.r * spec.n_enabled
    if spec.groups is None:
        return rank, spec.alpha
    return rank, spec.scaling * (math.sqrt(rank) if spec.use_rslora else rank)


def _derived_patterns(shapes: dict[str, tuple[int, float]]) -> tuple[int, float, dict, dict]:
    r = Counter(rank for rank, _ in shapes.values()).most_common(1)[0][0]
    alpha = Counter(a for _, a in shapes.values()).most_common(1)[0][0]
    rank_pattern = {re.escape(n): rank for n, (rank, _) in shapes.items() if rank != r}
    alpha_pattern = {re.escape(n): a for n, (_, a) in shapes.items() if a != alpha}
    return r, alpha, rank_pattern, alpha_pattern


def _compact_targets(model: nn.Module, adapted: list[str]) -> list[str]:
    """Short names (q_proj) when they select exactly the adapted modules, else the full names."""
    short = sorted({n.rsplit(".", 1)[-1] for n in adapted})
    selected = {n for n, _ in adaptable_modules(model) if name_matches(short, n)}
    return short if selected == set(adapted) else adapted


def _task_type(model: nn.Module) -> str | None:
    """PEFT's task_type for a transformers model class, None for anything else."""
    if not type(model).__module__.startswith("transformers."):
        return None
    from transformers.models.auto import modeling_auto

    name = type(model).__name__
    for task, table in _TASK_MAPPINGS.items():
        classes = getattr(modeling_auto, table, {}).values()
        if any(name == c or (isinstance(c, tuple) and name in c) for c in classes):
            return task
    return None


def _read_tensors(folder: Path) -> dict[str, Tensor]:
    path = folder / WEIGHTS_NAME
    if not path.is_file():
        if (folder / LEGACY_WEIGHTS_NAME).is_file():
            return _torch_load(folder / LEGACY_WEIGHTS_NAME)
        raise FormatError(f"{folder}: {WEIGHTS_NAME} is missing")
    try:
        return load_safetensors(path.read_bytes())
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise FormatError(f"{path}: not a readable safetensors file ({exc}); it is truncated or corrupt, "
                          "save the adapter again") from None


def _torch_load(path: Path) -> dict[str, Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FormatError(f"{path}: no such file") from None
    except Exception as exc:  # torch raises many kinds for a damaged pickle
        raise FormatError(f"{path}: not a readable PyTorch checkpoint ({exc})") from None
    if not isinstance(state, dict):
        raise FormatError(f"{path}: holds a {type(state).__name__}, not a state dict")
    return state


def _split_key(key: str) -> tuple[str, str | None]:
    """'x.q_proj.lora_A.weight' -> ('x.q_proj', 'A'); also PEFT's older keys with the adapter name left in."""
    for suffix, kind in _FILE_SUFFIXES.items():
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], kind
        head, _, tail = key.rpartition(".")
        stem = suffix.split(".")[0]
        if tail == "weight" and head.rsplit(".", 1)[0].endswith("." + stem):  # x.q_proj.lora_A.default.weight
            return head.rsplit(".", 1)[0][: -len(stem) - 1], kind
    return key, None


def _config_from_file(file: AdapterFile) -> LoraConfig:
    config, init = file.config, _init_from_file(file)
    try:
        return LoraConfig(
            init=init,
            r=int(config["r"]),
            alpha=config["lora_alpha"],
            dropout=float(config.get("lora_dropout") or 0.0),
            target_modules=sorted(file.pairs),
            bias=config.get("bias") or "none",
            use_rslora=bool(config.get("use_rslora", False)),
            use_dora=bool(config.get("use_dora", False)),
            rank_pattern=config.get("rank_pattern") or {},
            alpha_pattern=config.get("alpha_pattern") or {},
            modules_to_save=list(config.get("modules_to_save") or []),
        )
    except LorakitError as exc:
        raise FormatError(f"{file.folder / CONFIG_NAME}: {exc}") from None


def _init_from_file(file: AdapterFile) -> str:
    """The init that matters when loading: PiSSA files hold A and B for the residual, so the base is decomposed
    again; every other file holds the whole update."""
    init = file.config.get("init_lora_weights")
    if init == "pissa":
        return init
    if isinstance(init, str) and pissa.is_pissa(init):
        raise FormatError(f"{file.folder / CONFIG_NAME}: init_lora_weights is {init!r}: the tensors go with a residual "
                          "from a randomized SVD that cannot be repeated; convert the adapter where it was trained "
                          "(PEFT: save_pretrained(path_initial_model_for_weight_conversion=...); lorakit: lk.save)")
    return "kaiming"


def _check_saved(model: nn.Module, modules: dict[str, nn.Module], file: AdapterFile, cfg: LoraConfig,
                 problems: list[str]) -> dict[str, tuple[str, str]]:
    """Map each modules_to_save tensor to (module, parameter), noting keys the model lacks."""
    targets = {}
    for key, tensor in file.saved.items():
        module_name, _, param_name = key.rpartition(".")
        owner = modules.get(module_name)
        if owner is None or not any(name_matches([s], module_name) for s in cfg.modules_to_save):
            problems.append(f"key {PREFIX}{key}: not a LoRA tensor and not in modules_to_save "
                            f"{cfg.modules_to_save} of this model")
            continue
        original = owner.original_module if hasattr(owner, "original_module") else owner
        param = original.state_dict().get(param_name)
        if param is None or param.shape != tensor.shape:
            found = "no such tensor" if param is None else f"shape {tuple(param.shape)}"
            problems.append(f"key {PREFIX}{key}: file has {tuple(tensor.shape)}, model has {found}")
            continue
        targets[key] = (module_name, param_name)
    return targets


def _loralib_spec(name: str, module: nn.Module, pair: dict[str, Tensor], alpha: float, r: int | None,
                  enable_lora: list[bool] | None, source: str) -> AdapterSpec:
    A, B = pair["A"], pair["B"]
    out_features = planned_shapes(module, AdapterSpec(r=1, alpha=1))[1][0]
    if r is not None and r != B.shape[1]:
        raise FormatError(f"{source}: {name} has rank {B.shape[1]}, not r={r}")
    if B.shape[0] == out_features:
        return AdapterSpec(r=A.shape[0], alpha=alpha)
    if enable_lora is None:
        raise FormatError(f"{source}: {name} lora_B has {B.shape[0]} rows for {out_features} outputs, a fused "
                          "MergedLinear; pass enable_lora (e.g. [True, False, True] for GPT-2 c_attn q and v)")
    return AdapterSpec(r=B.shape[1], alpha=alpha, groups=tuple(bool(e) for e in enable_lora))
