"""Matching target modules, swapping them to LoRA layers, and freezing the base.

Everything is checked before the model is touched, so a bad config leaves the model as it was.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from . import pissa
from .adapters import set_active, set_trainable
from .config import ARCHITECTURE_TARGETS, LoraConfig
from .errors import LorakitError
from .layers.core import AdapterSpec, LoraLayer
from .layers.modules_to_save import ModulesToSave
from .layers.registry import ADAPTABLE_KINDS, is_linear_like, lora_class_for
from .layers.variant import variant_of
from .module_tree import name_matches, replace_module
from .state import STATE_ATTRIBUTE, LorakitState, find_state, get_state, lora_layers

ADAPTER_NAME = re.compile(r"[A-Za-z0-9_\-]+")


@dataclass
class _Target:
    name: str
    module: nn.Module
    lora_class: type[LoraLayer] | None  # None when it is already a LoRA layer
    spec: AdapterSpec


def inject(model: nn.Module, cfg: LoraConfig, adapter: str = "default") -> nn.Module:
    """Wrap the layers `cfg` targets in place, freeze the base, and make `adapter` active and trainable.

    With init="pissa" each target's base weight becomes its PiSSA residual (see lorakit.pissa), so such an
    adapter must be the model's only one.
    """
    _check_arguments(model, cfg, adapter)
    if find_state(model) is not None:
        raise LorakitError(
            f"this model already has lorakit adapters {sorted(get_state(model).configs)}; use "
            "lk.add_adapter(model, name, cfg) for another one, or lk.unload(model) to start over"
        )
    targets, saved = _plan(model, cfg)
    return _commit(model, cfg, adapter, targets, saved)


def add_adapter(model: nn.Module, adapter: str, cfg: LoraConfig) -> nn.Module:
    """Another adapter on the same base; it starts neither active nor trainable."""
    _check_arguments(model, cfg, adapter)
    state = get_state(model)
    if adapter in state.configs:
        raise LorakitError(f"adapter {adapter!r} already exists; delete it first or pick another name")
    if any(m.lora_merged for _, m in lora_layers(model)):
        raise LorakitError("adapters are merged into the weights; call lk.unmerge(model) before adding one")
    targets, saved = _plan(model, cfg)
    return _commit(model, cfg, adapter, targets, saved)


def attach(model: nn.Module, adapter: str, cfg: LoraConfig, specs: dict[str, AdapterSpec]) -> nn.Module:
    """Adapters with explicit per-module settings (read from a file): `inject` on a plain model, else
    `add_adapter`. `cfg` is kept for saving; its targets are not matched again."""
    state = find_state(model)
    if state is not None and adapter in state.configs:
        raise LorakitError(f"adapter {adapter!r} already exists; delete it first or load under another name")
    modules = dict(base_modules(model))
    targets = [_Target(name, modules[name], _lora_class(name, modules[name]), spec) for name, spec in specs.items()]
    _check_pissa(model, cfg, targets)
    return _commit(model, cfg, adapter, targets, _plan_saved(model, cfg.modules_to_save))


def adaptable_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Modules lorakit could adapt (or has adapted), skipping lorakit's own internals."""
    for name, module in base_modules(model):
        if isinstance(module, LoraLayer) or lora_class_for(type(module)) is not None:
            yield name, module


def output_head_name(model: nn.Module) -> str | None:
    """The output projection that "all-linear" leaves alone (the model's output embeddings)."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None:
        return None
    return next((name for name, module in model.named_modules() if module is head), None)


def resolve_targets(model: nn.Module, target_modules: list[str] | str | None) -> list[str] | str:
    """LoraConfig.target_modules' shorthands made concrete: None -> architecture default, "all-linear" -> names."""
    if target_modules is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in ARCHITECTURE_TARGETS:
            raise LorakitError(
                f"no default target_modules for model_type {model_type!r}; pass target_modules=[...] "
                f"(adaptable here: {_summarize(n for n, _ in adaptable_modules(model))})"
            )
        return ARCHITECTURE_TARGETS[model_type]
    if target_modules == "all-linear":
        head = output_head_name(model)
        return [n for n, m in adaptable_modules(model) if is_linear_like(type(m)) and n != head]
    return target_modules


def _check_arguments(model: nn.Module, cfg: LoraConfig, adapter: str) -> None:
    if not isinstance(model, nn.Module):
        raise LorakitError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(cfg, LoraConfig):
        raise LorakitError(f"cfg must be a lorakit.LoraConfig, got {type(cfg).__name__}")
    if not isinstance(adapter, str) or not ADAPTER_NAME.fullmatch(adapter):
        raise LorakitError(f"adapter name must be letters, digits, '_' or '-', got {adapter!r}")


def _plan(model: nn.Module, cfg: LoraConfig) -> tuple[list[_Target], list[tuple[str, nn.Module]]]:
    saved = _plan_saved(model, cfg.modules_to_save)
    saved_names = [n for n, _ in saved]
    targets = resolve_targets(model, cfg.target_modules)
    matched = [
        (name, module)
        for name, module in base_modules(model)
        if name_matches(targets, name)
        and not (cfg.exclude_modules is not None and name_matches(cfg.exclude_modules, name))
        and not any(name == s or name.startswith(s + ".") for s in saved_names)
    ]
    if not matched:
        raise LorakitError(
            f"no module matched target_modules={targets!r}"
            + (f" (after exclude_modules={cfg.exclude_modules!r})" if cfg.exclude_modules else "")
            + f"; adaptable modules in this model: {_summarize(n for n, _ in adaptable_modules(model))}"
        )
    plan = []
    for name, module in matched:
        spec = AdapterSpec(r=cfg.rank_for(name), alpha=cfg.alpha_for(name), dropout=cfg.dropout,
                           use_rslora=cfg.use_rslora, use_dora=cfg.use_dora)
        refusal = variant_of(spec).check(_lora_class(name, module) or type(module), spec)
        if refusal:
            raise LorakitError(f"{name!r}: {refusal}; narrow target_modules")
        plan.append(_Target(name, module, _lora_class(name, module, model), spec))
    _check_pissa(model, cfg, plan)
    return plan, saved


def _check_pissa(model: nn.Module, cfg: LoraConfig, targets: list[_Target]) -> None:
    pissa.check_adding(model, cfg.init)
    if pissa.is_pissa(cfg.init):
        for target in targets:
            pissa.check_target(target.name, target.module, target.spec)


def _lora_class(name: str, module: nn.Module, model: nn.Module | None = None) -> type[LoraLayer] | None:
    """The class `module` is swapped to (None: already a LoRA layer); a clear error when it cannot be."""
    if isinstance(module, LoraLayer):
        return None
    lora_class = lora_class_for(type(module))
    if lora_class is None:
        hint = f"; narrow target_modules, e.g. to: {_summarize(n for n, _ in adaptable_modules(model))}" if model else ""
        raise LorakitError(
            f"target {name!r} is a {type(module).__name__}, which lorakit cannot adapt (it adapts {ADAPTABLE_KINDS})"
            + hint
        )
    groups = getattr(module, "groups", 1)
    if isinstance(module, nn.modules.conv._ConvNd) and groups != 1:
        raise LorakitError(f"target {name!r} is a convolution with groups={groups}; lorakit adapts groups=1 only")
    return lora_class


def _plan_saved(model: nn.Module, names: list[str]) -> list[tuple[str, nn.Module]]:
    found = []
    for wanted in names:
        hits = [(n, m) for n, m in base_modules(model) if name_matches([wanted], n)]
        if not hits:
            raise LorakitError(f"modules_to_save entry {wanted!r} matches no module in this model")
        found.extend(hits)
    return found


def _commit(model: nn.Module, cfg: LoraConfig, adapter: str, targets: list[_Target],
            saved: list[tuple[str, nn.Module]]) -> nn.Module:
    """Apply a checked plan: a first adapter becomes active and trainable, later ones neither. Should any
    step still fail, everything done so far is undone, so a refusal leaves the model as it was."""
    state = find_state(model)
    undo = _Undo(model, cfg, adapter, targets, saved)
    try:
        if state is None:
            setattr(model, STATE_ATTRIBUTE, LorakitState())
        _apply(model, cfg, adapter, targets, saved)
        set_active(model, state.active if state else adapter)
        set_trainable(model, state.trainable if state else adapter)
    except BaseException:
        undo.restore()
        raise
    return model


class _Undo:
    """What `_commit` may change (classes, wrappers, bookkeeping, requires_grad, PiSSA's base weights), recorded
    before it starts so a failure half-way can put it back."""

    def __init__(self, model: nn.Module, cfg: LoraConfig, adapter: str, targets: list[_Target],
                 saved: list[tuple[str, nn.Module]]) -> None:
        self.model, self.adapter, self.targets, self.saved = model, adapter, targets, saved
        self.state = find_state(model)
        self.settings = (self.state.active, self.state.trainable) if self.state else None
        self.requires_grad = [(p, p.requires_grad) for p in model.parameters()]
        self.layer_active = {id(t.module): getattr(t.module, "lora_active", ()) for t in targets}
        self.weights = {id(t.module): t.module.weight.detach().clone()
                        for t in targets if pissa.is_pissa(cfg.init)}

    def restore(self) -> None:
        for target in self.targets:
            module = target.module
            if target.lora_class is not None and isinstance(module, LoraLayer):
                module.lora_teardown()
            elif target.lora_class is None and self.adapter in module.lora_adapters:
                module.lora_delete(self.adapter)
                module.lora_set_active(self.layer_active[id(module)])
            if id(module) in self.weights:
                with torch.no_grad():
                    module.weight.copy_(self.weights[id(module)])
        for name, module in self.saved:
            if isinstance(module, ModulesToSave):
                module.modules_to_save.pop(self.adapter, None)
            elif self.model.get_submodule(name) is not module:
                replace_module(self.model, name, module)
        if self.state is None:
            self.model.__dict__.pop(STATE_ATTRIBUTE, None)
        else:
            self.state.configs.pop(self.adapter, None)
            self.state.active, self.state.trainable = self.settings
        for param, flag in self.requires_grad:
            param.requires_grad = flag


def _apply(model: nn.Module, cfg: LoraConfig, adapter: str, targets: list[_Target],
           saved: list[tuple[str, nn.Module]]) -> None:
    for target in targets:
        module = target.module
        if target.lora_class is not None:
            module.__class__ = target.lora_class
            module.lora_setup()
        if pissa.is_pissa(cfg.init):
            pissa.add(module, adapter, target.spec, cfg.init)
        else:
            module.lora_add(adapter, target.spec, cfg.init)
    for name, module in saved:
        wrapper = module if isinstance(module, ModulesToSave) else _wrap(model, name, module)
        wrapper.add_copy(adapter)
    get_state(model).configs[adapter] = cfg


def _wrap(model: nn.Module, name: str, module: nn.Module) -> ModulesToSave:
    wrapper = ModulesToSave(module)
    replace_module(model, name, wrapper)
    return wrapper


def base_modules(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """named_modules() without lorakit's internals (adapter dicts, saved copies)."""
    for child_name, child in model.named_children():
        name = f"{prefix}.{child_name}" if prefix else child_name
        yield name, child
        if not isinstance(child, (LoraLayer, ModulesToSave)):
            yield from base_modules(child, name)


def _summarize(names: Iterator[str], limit: int = 20) -> str:
    """Distinct last name parts, with one full example each: 'q_proj (model.layers.0.self_attn.q_proj)'."""
    examples: dict[str, str] = {}
    for name in names:
        examples.setdefault(name.rsplit(".", 1)[-1], name)
    if not examples:
        return "none"
    shown = [k if k == v else f"{k} ({v})" for k, v in list(examples.items())[:limit]]
    return ", ".join(shown) + (f", ... {len(examples) - limit} more" if len(examples) > limit else "")
