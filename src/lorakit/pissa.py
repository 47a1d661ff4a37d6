"""PiSSA (Meng et al., 2024): start an adapter from the top-r singular directions of W, keep the rest in the base.

With W = U·S·Vh (as an (out, in) matrix) and s the adapter's scaling, A0 = sqrt(S_r / s)·Vh_r and
B0 = U_r·sqrt(S_r / s), so s·B0·A0 is W's best rank-r part, and the base weight becomes the residual
W - s·B0·A0. The model's output is unchanged at the start, but training moves W's principal directions
instead of growing an update from zero. The formulas (and the operation order) are PEFT's, so the same base
weight gives the same A, B and residual as `init_lora_weights="pissa"`.

The base weight is no longer the original, so the starting pair is kept: after training the whole change
against the original weight is s·(B·A - B0·A0) = s·[B, -B0]·[A; A0], an ordinary LoRA pair of rank 2r with
the same scaling. That is what files hold by default, so they work on the unmodified base.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .config import PISSA_NITER, LoraConfig
from .errors import LorakitError
from .layers.core import AdapterSpec, LoraLayer
from .layers.linear import LinearKind
from .layers.registry import lora_class_for, planned_shapes
from .state import lora_layers


@dataclass(frozen=True)
class PissaSpec(AdapterSpec):
    """An adapter PiSSA started: its settings and the starting pair (A0, B0).

    The pair is only read when saving, so it lives on the CPU, outside parameters and state dicts; it
    leaves with the adapter (delete, unload) because the spec does.
    """

    origin: tuple[Tensor, Tensor] = field(kw_only=True, compare=False, repr=False)


def is_pissa(init: str) -> bool:
    return init == "pissa" or PISSA_NITER.fullmatch(init) is not None


def check_adding(model: nn.Module, init: str) -> None:
    """One PiSSA adapter per model, alone: it rewrites the base weights every other adapter sits on."""
    names = {n for _, layer in lora_layers(model) for n in layer.lora_adapters}
    started = sorted({n for _, layer in lora_layers(model) for n in layer.lora_adapters if origin(layer, n)})
    if started:
        raise LorakitError(
            f"adapter {started[0]!r} was started with PiSSA, so this model's base weights hold its residuals and "
            "another adapter would sit on them instead of on the original weights; save it with lk.save (a plain "
            "LoRA file for the original base) and load the adapters together onto a fresh copy of the base model"
        )
    if is_pissa(init) and names:
        raise LorakitError(
            f"init={init!r} rewrites the base weights that the adapters {sorted(names)} already sit on; add the "
            "PiSSA adapter to a fresh model (alone), or use init='kaiming' for this one"
        )


def check_target(name: str, module: nn.Module, spec: AdapterSpec) -> None:
    """Refuse, before the model changes, layers PiSSA cannot decompose and ranks their weight does not have."""
    cls = type(module) if isinstance(module, LoraLayer) else lora_class_for(type(module))
    if cls is None or not issubclass(cls, LinearKind):
        raise LorakitError(f"init='pissa' decomposes linear weights only; {name!r} is a {type(module).__name__}: "
                           "narrow target_modules to linear layers, or use init='kaiming'")
    if cls.lora_merge_blocker:  # a weight that cannot be written in place cannot hold the residual either
        raise LorakitError(f"init='pissa' writes the residual into the base weight, which {name!r} "
                           f"({type(module).__name__}, e.g. 4-bit) cannot rewrite; use init='kaiming' on it")
    (_, fan_in), (fan_out, _) = planned_shapes(module, spec)
    if spec.r > min(fan_in, fan_out):
        raise LorakitError(f"init='pissa' takes the top r singular directions, and {name!r} ({fan_out} x {fan_in}) "
                           f"has {min(fan_in, fan_out)}, fewer than r={spec.r}; lower r for it with rank_pattern")


def add(layer: LoraLayer, name: str, spec: AdapterSpec, init: str) -> None:
    """Add adapter `name` to `layer` started from W's top-r SVD, and write the residual into the base weight."""
    layer.lora_add(name, spec)
    A, B = layer.lora_A[name], layer.lora_B[name]
    weight = layer.lora_dense_weight().detach().to(A.dtype)  # float32 (float64 for a float64 base)
    A0, B0 = _principal_pair(weight, spec.r, spec.scaling, init)
    with torch.no_grad():
        A.copy_(A0)
        B.copy_(B0)
    layer._lora_write_weight(weight - spec.scaling * B0 @ A0)
    settings = {f.name: getattr(spec, f.name) for f in dataclasses.fields(AdapterSpec)}
    layer.lora_adapters[name] = PissaSpec(**settings, origin=(A0.cpu(), B0.cpu()))


def origin(layer: LoraLayer, name: str) -> tuple[Tensor, Tensor] | None:
    """(A0, B0) of a PiSSA adapter, None for any other."""
    spec = layer.lora_adapters[name]
    return spec.origin if isinstance(spec, PissaSpec) else None


def lora_pair(layer: LoraLayer, name: str) -> tuple[Tensor, Tensor]:
    """A PiSSA adapter as a plain pair against the original weight: [A; A0] (2r, in) and [B, -B0] (out, 2r)."""
    A, B = layer.lora_A[name].detach(), layer.lora_B[name].detach()
    A0, B0 = (t.to(A) for t in origin(layer, name))
    return torch.cat([A, A0]), torch.cat([B, -B0], dim=1)


def lora_rank_alpha(spec: AdapterSpec) -> tuple[int, float]:
    """Rank 2r and the alpha that keeps the scaling there: 2·alpha, or sqrt(2)·alpha with rsLoRA."""
    return 2 * spec.r, spec.alpha * _alpha_factor(spec.use_rslora)


def lora_config(cfg: LoraConfig) -> LoraConfig:
    """The config of a converted file: a plain LoRA at twice every rank, alphas keeping every scaling."""
    factor = _alpha_factor(cfg.use_rslora)
    return cfg.replace(init="kaiming", r=2 * cfg.r, alpha=cfg.alpha * factor,
                       rank_pattern={k: 2 * v for k, v in cfg.rank_pattern.items()},
                       alpha_pattern={k: v * factor for k, v in cfg.alpha_pattern.items()})


def _alpha_factor(use_rslora: bool) -> float:
    return math.sqrt(2) if use_rslora else 2


def _principal_pair(weight: Tensor, r: int, scaling: float, init: str) -> tuple[Tensor, Tensor]:
    """A0 (r, in) and B0 (out, r) with scaling·B0·A0 = W's top-r part; "pissa_niter_k" uses torch.svd_lowrank."""
    if init == "pissa":
        U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
        U, S, Vh = U[:, :r], S[:r], Vh[:r]
    else:
        U, S, V = torch.svd_lowrank(weight, q=r, niter=int(PISSA_NITER.fullmatch(init).group(1)))
        Vh = V.T
    root = torch.diag(torch.sqrt(S / scaling))
    return root @ Vh, U @ root
