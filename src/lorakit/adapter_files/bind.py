"""Binding a parsed adapter folder to a model: every tensor is placed and checked first, then the model changes.

Besides LoRA pairs a folder may hold whole modules (modules_to_save: a classification head, nested or not),
trained biases (bias="all" / "lora_only", `<module>.base_layer.bias` or `<module>.bias`) and full embedding
weights (PEFT's save_embedding_layers, after adding tokens). Each goes where PEFT puts it; any tensor the
file's options do not explain is refused by name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..config import LoraConfig
from ..errors import FormatError
from ..inject import attach, base_modules, name_matches
from ..layers.core import AdapterSpec, LoraLayer
from ..layers.registry import lora_class_for, planned_shapes
from ..layers.variant import variant_of
from .layout import BASE_LAYER, PREFIX
from .parse import AdapterFile, config_from_file, read_adapter


@dataclass
class Placement:
    """Where each of a file's tensors goes, found without changing the model."""

    specs: dict[str, AdapterSpec] = field(default_factory=dict)  # module -> adapter settings
    saved: dict[str, tuple[str, str]] = field(default_factory=dict)  # file key -> (saved module, its tensor name)
    base: dict[str, tuple[str, str]] = field(default_factory=dict)  # file key -> (module, parameter) of the base
    problems: list[str] = field(default_factory=list)


def load(model: nn.Module, folder: str | os.PathLike, adapter: str = "default") -> nn.Module:
    """Load a lorakit or PEFT adapter folder into `model` (injecting layers when it has none).

    Every tensor is checked against the model first; on any mismatch the model is left untouched. A model
    without adapters gets this one active and trainable; otherwise it is added neither (as add_adapter).
    Trained biases and embedding weights in the file replace the model's own, as in PEFT.
    """
    file = read_adapter(folder)
    cfg = config_from_file(file)
    placement = place(model, file, cfg)
    if placement.problems:
        shown = "\n  ".join(placement.problems[:12])
        more = f"\n  ... {len(placement.problems) - 12} more" if len(placement.problems) > 12 else ""
        raise FormatError(f"{file.weights} does not fit this model:\n  {shown}{more}")
    saved_modules = sorted({module for module, _ in placement.saved.values()})
    attach(model, adapter, cfg.replace(modules_to_save=saved_modules), placement.specs)
    copy_pairs(model, adapter, file.pairs)
    with torch.no_grad():
        for key, (module_name, tensor_name) in placement.saved.items():
            copy = model.get_submodule(module_name).modules_to_save[adapter]
            copy.state_dict()[tensor_name].copy_(file.saved[key])
        for key, (module_name, param) in placement.base.items():
            getattr(model.get_submodule(module_name), param).copy_(file.saved[key])
    return model


def copy_pairs(model: nn.Module, adapter: str, pairs: dict[str, dict[str, Tensor]]) -> None:
    """Write checked A, B (and DoRA magnitude) tensors into the adapter's parameters."""
    with torch.no_grad():
        for name, pair in pairs.items():
            layer = model.get_submodule(name)
            layer.lora_A[adapter].copy_(pair["A"])
            layer.lora_B[adapter].copy_(pair["B"])
            if "M" in pair:
                layer.lora_magnitude[adapter].copy_(pair["M"])


def place(model: nn.Module, file: AdapterFile, cfg: LoraConfig) -> Placement:
    modules = dict(base_modules(model))
    placement = Placement()
    for name, pair in sorted(file.pairs.items()):
        spec = _pair_spec(name, modules.get(name), pair, cfg, placement.problems)
        if spec is not None:
            placement.specs[name] = spec
    for key, tensor in sorted(file.saved.items()):
        _place_tensor(model, modules, key, tensor, cfg, placement)
    _check_complete(modules, file, placement)
    return placement


def _pair_spec(name: str, module: nn.Module | None, pair: dict[str, Tensor], cfg: LoraConfig,
               problems: list[str]) -> AdapterSpec | None:
    if module is None or (not isinstance(module, LoraLayer) and lora_class_for(type(module)) is None):
        what = "has no module" if module is None else f"cannot adapt {type(module).__name__} at"
        problems.append(f"key {PREFIX}{name}.*: the model {what} {name!r}")
        return None
    spec = AdapterSpec(r=pair["A"].shape[0], alpha=cfg.alpha_for(name), dropout=cfg.dropout,
                       use_rslora=cfg.use_rslora, use_dora=cfg.use_dora or "M" in pair)
    kind = type(module) if isinstance(module, LoraLayer) else lora_class_for(type(module))
    refusal = variant_of(spec).check(kind, spec)
    if refusal:
        problems.append(f"key {PREFIX}{name}.*: {refusal}")
        return None
    expected = planned_shapes(module, spec)
    if spec.use_dora:
        expected = (*expected, (expected[1][0],))
        if "M" not in pair:
            problems.append(f"key {PREFIX}{name}.lora_magnitude_vector: missing, and the config says use_dora")
            return None
    for kind_name, want in zip("ABM", expected):
        if tuple(pair[kind_name].shape) != tuple(want):
            problems.append(f"key {PREFIX}{name} lora_{kind_name}: file has {tuple(pair[kind_name].shape)}, "
                            f"model expects {tuple(want)} (trained for another base?)")
    return spec


def _place_tensor(model: nn.Module, modules: dict[str, nn.Module], key: str, tensor: Tensor, cfg: LoraConfig,
                  placement: Placement) -> None:
    """A non-LoRA tensor: a modules_to_save module's, a trained bias, or a full embedding weight."""
    if f".{BASE_LAYER}." in key:
        module_name, param = key.split(f".{BASE_LAYER}.", 1)
        _place_base(model, modules, key, module_name, param, tensor, cfg, placement)
        return
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        owner = ".".join(parts[:cut])
        if owner in modules and any(name_matches([s], owner) for s in cfg.modules_to_save):
            tensor_name = ".".join(parts[cut:])
            original = getattr(modules[owner], "original_module", modules[owner])
            found = original.state_dict().get(tensor_name)
            if found is None or found.shape != tensor.shape:
                what = "no such tensor" if found is None else f"shape {tuple(found.shape)}"
                placement.problems.append(f"key {PREFIX}{key}: modules_to_save {owner!r} has {what}, the file "
                                          f"{tuple(tensor.shape)}")
            else:
                placement.saved[key] = (owner, tensor_name)
            return
    module_name, _, param = key.rpartition(".")
    _place_base(model, modules, key, module_name, param, tensor, cfg, placement)


def _place_base(model: nn.Module, modules: dict[str, nn.Module], key: str, module_name: str, param: str,
                tensor: Tensor, cfg: LoraConfig, placement: Placement) -> None:
    module = modules.get(module_name)
    bias = "bias" in param and cfg.bias != "none"  # the parameters bias="all" trains, as PEFT names them
    embedding = param == "weight" and module is not None and _is_embedding(model, module)
    if not (bias or embedding):
        placement.problems.append(
            f"key {PREFIX}{key}: not a LoRA tensor, and the file's options explain no other tensor here "
            f"(modules_to_save={cfg.modules_to_save or None}, bias={cfg.bias!r}; full weights only for embeddings)"
            + ("" if module is not None else f"; the model has no module {module_name!r}"))
        return
    if module is None:
        placement.problems.append(f"key {PREFIX}{key}: the model has no module {module_name!r}")
        return
    current = getattr(module, param, None)
    if not isinstance(current, Tensor) or current.shape != tensor.shape:
        found = "none" if not isinstance(current, Tensor) else str(tuple(current.shape))
        hint = (f"; the file's vocabulary has {tensor.shape[0]} rows: call model.resize_token_embeddings"
                f"({tensor.shape[0]}) first" if embedding and isinstance(current, Tensor) else "")
        placement.problems.append(f"key {PREFIX}{key}: file has {tuple(tensor.shape)}, model {module_name}.{param} "
                                  f"has {found}{hint}")
        return
    if embedding and getattr(module, "lora_merged", ()):
        placement.problems.append(f"key {PREFIX}{key}: {module_name} has merged adapters; lk.unmerge(model) first")
        return
    placement.base[key] = (module_name, param)


def _is_embedding(model: nn.Module, module: nn.Module) -> bool:
    """Input or output embeddings, whose full weights PEFT saves with save_embedding_layers."""
    heads = [getattr(model, f, lambda: None)() for f in ("get_input_embeddings", "get_output_embeddings")
             if callable(getattr(model, f, None))]
    return isinstance(module, nn.Embedding) or any(module is h for h in heads)


def _check_complete(modules: dict[str, nn.Module], file: AdapterFile, placement: Placement) -> None:
    """A modules_to_save module is loaded whole or not at all."""
    by_module: dict[str, set[str]] = {}
    for owner, tensor_name in placement.saved.values():
        by_module.setdefault(owner, set()).add(tensor_name)
    for owner, present in by_module.items():
        original = getattr(modules[owner], "original_module", modules[owner])
        missing = sorted(set(original.state_dict()) - present)
        if missing:
            placement.problems.append(f"modules_to_save {owner!r}: the file lacks {missing}; it is incomplete")
