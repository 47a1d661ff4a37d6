"""The one adapter core every base kind shares: adapter parameters, scaling, forward, delta, merge/unmerge.

A LoRA layer is the user's own module with its class swapped for a subclass that mixes in `LoraLayer`,
so parameter names (`q_proj.weight`) and isinstance checks stay as they were and no wrapper module adds
a call to every forward. A base kind (Linear, Conv1D, Embedding, Conv, Linear4bit) supplies only the hooks
below: the adapter shapes, how the input reaches rank space, how rank space reaches the output, how a dense
(out, in) delta is laid out like its weight and back, its base forward and its output size. What an adapter
does beyond plain LoRA (DoRA, ...) is its variant's business (variant.py); the core asks the variant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import lora_scaling
from ..errors import LorakitError
from . import routing, variant
from .variant import Variant

LORA_ATTRIBUTES = (
    "lora_adapters", "lora_variants", "lora_active", "lora_merged", "lora_live", "lora_disabled",
    "lora_merge_on_eval", "lora_routes", "lora_merge_state", "lora_cache", "lora_inplace", "lora_fused",
)
LORA_PARAMETER_DICTS = ("lora_A", "lora_B")


@dataclass(frozen=True)
class AdapterSpec:
    """Per-layer settings of one adapter.

    `groups` splits the output into equal parts and gives each enabled part its own rank-r pair
    (loralib's MergedLinear `enable_lora`, for fused qkv projections); None adapts the whole output.
    """

    r: int
    alpha: float
    dropout: float = 0.0
    use_rslora: bool = False
    groups: tuple[bool, ...] | None = None
    use_dora: bool = False

    @property
    def scaling(self) -> float:
        return lora_scaling(self.r, self.alpha, self.use_rslora)

    @property
    def n_enabled(self) -> int:
        return sum(self.groups) if self.groups else 1


class LoraLayer:
    """Mixin holding any number of named adapters on a base layer; see the module docstring."""

    lora_base_class: ClassVar[type[nn.Module]]
    lora_zero_init_A: ClassVar[bool] = False  # embeddings start from A = 0, B random (PEFT's choice)
    lora_merge_blocker: ClassVar[str | None] = None  # why this kind cannot merge in place, if it cannot
    lora_is_linear: ClassVar[bool] = False  # a dense projection: output rows are the weight's rows
    lora_inplace_kind: ClassVar[bool] = False  # a base whose output the adapter may update in place
    lora_fusable_kind: ClassVar[bool] = False  # a base whose forward `lora_fused_forward` computes with an adapter

    lora_A: nn.ParameterDict
    lora_B: nn.ParameterDict  # plus one ParameterDict per variant extra (e.g. DoRA's lora_magnitude)
    lora_adapters: dict[str, AdapterSpec]
    lora_variants: dict[str, Variant]  # each adapter's variant (variant.py)
    lora_merge_state: dict[str, Tensor]  # what a variant kept when merging, to unmerge exactly
    lora_cache: dict[str, Any]  # a variant's per-adapter cache (e.g. DoRA's weight norms)
    lora_active: tuple[str, ...]
    lora_merged: tuple[str, ...]
    lora_live: tuple[str, ...]
    lora_inplace: bool  # every live adapter can take its variant's in-place path (inplace_autograd.py)
    lora_fused: str | None  # the one live adapter the fused step computes with the base (fused_linear.py)
    lora_disabled: bool
    lora_merge_on_eval: bool
    lora_routes: routing.RoutePlan | None  # per-row adapters inside an lk.route block

    # ---- hooks a base kind implements -------------------------------------------------------------
    def lora_shapes(self, spec: AdapterSpec) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of A and B; kinds without fused parts reject `spec.groups`."""
        raise NotImplementedError

    def lora_hidden(self, x: Tensor, A: Tensor) -> Tensor:
        """Input -> rank space."""
        raise NotImplementedError

    def lora_expand(self, h: Tensor, B: Tensor) -> Tensor:
        """Rank space -> output space."""
        raise NotImplementedError

    def lora_weight_layout(self, delta: Tensor) -> Tensor:
        """A dense (out, in * kernel) delta shaped like this layer's `weight`."""
        raise NotImplementedError

    def lora_dense_weight(self) -> Tensor:
        """The base weight as an (out, in * kernel) matrix: the inverse of `lora_weight_layout`."""
        raise NotImplementedError

    def lora_base_forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return self.lora_base_class.forward(self, x, *args, **kwargs)

    @property
    def lora_out_features(self) -> int:
        raise NotImplementedError

    def lora_fused_forward(self, x: Tensor, name: str) -> Tensor | None:
        """Base output plus adapter `name`'s term in one fused function (kinds with `lora_fusable_kind`),
        or None when this call cannot take it (dropout in training, dtypes the unfused path would mix)."""
        return None

    # ---- set-up -----------------------------------------------------------------------------------
    def lora_setup(self, merge_on_eval: bool = False) -> None:
        """Give a freshly swapped (or constructed) module empty adapter state."""
        for dict_name in (*LORA_PARAMETER_DICTS, *variant.parameter_dicts()):
            setattr(self, dict_name, nn.ParameterDict())
        self.lora_adapters = {}
        self.lora_variants = {}
        self.lora_merge_state = {}
        self.lora_cache = {}
        self.lora_active = ()
        self.lora_merged = ()
        self.lora_live = ()
        self.lora_inplace = False
        self.lora_fused = None
        self.lora_disabled = False
        self.lora_merge_on_eval = merge_on_eval
        self.lora_routes = None
        self._register_load_state_dict_pre_hook(_accept_loralib_keys, with_module=True)

    def lora_teardown(self) -> None:
        """Remove every trace of lorakit and restore the original class."""
        for name in (*LORA_PARAMETER_DICTS, *variant.parameter_dicts()):
            delattr(self, name)
        for name in LORA_ATTRIBUTES:
            self.__dict__.pop(name, None)
        self._load_state_dict_pre_hooks.clear()
        self.__class__ = self.lora_base_class

    def lora_add(self, name: str, spec: AdapterSpec, init: str = "kaiming") -> None:
        if name in self.lora_adapters:
            raise LorakitError(f"adapter {name!r} already exists on {type(self).__name__}; pick another name")
        if spec.groups is not None and self.lora_out_features % len(spec.groups):
            raise LorakitError(
                f"enable_lora has {len(spec.groups)} parts but out_features={self.lora_out_features} "
                "does not split evenly into them"
            )
        kind = variant.variant_of(spec)
        refusal = kind.check(type(self), spec)
        if refusal:
            raise LorakitError(refusal)
        shape_a, shape_b = self.lora_shapes(spec)
        weight = self.lora_reference_weight()
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        A = torch.empty(shape_a, device=weight.device, dtype=dtype)
        B = torch.empty(shape_b, device=weight.device, dtype=dtype)
        _init_pair(A, B, spec.r, init, self.lora_zero_init_A)
        kind.add(self, name, spec, dtype)
        self.lora_A[name] = nn.Parameter(A)
        self.lora_B[name] = nn.Parameter(B)
        self.lora_adapters[name] = spec
        self.lora_variants[name] = kind

    def lora_delete(self, name: str) -> None:
        self.lora_variants.pop(name).delete(self, name)
        del self.lora_A[name], self.lora_B[name], self.lora_adapters[name]
        self.lora_active = tuple(n for n in self.lora_active if n != name)
        self.lora_refresh()

    def lora_parameters(self, name: str) -> list[nn.Parameter]:
        """Every trained tensor of adapter `name`: A, B and its variant's extras."""
        return [self.lora_A[name], self.lora_B[name], *self.lora_variants[name].extra_parameters(self, name).values()]

    def lora_file_tensors(self, name: str) -> dict[str, nn.Parameter]:
        """The variant's extra tensors of adapter `name` by adapter-file key suffix (e.g. lora_magnitude_vector)."""
        return self.lora_variants[name].extra_parameters(self, name)

    def lora_reference_weight(self) -> Tensor:
        """The tensor whose device (and float dtype) new adapters follow."""
        return self.weight

    # ---- state ------------------------------------------------------------------------------------
    def lora_set_active(self, names: Iterable[str]) -> None:
        self.lora_active = tuple(n for n in names if n in self.lora_adapters)
        self.lora_refresh()

    def lora_refresh(self) -> None:
        """Recompute which adapters the forward must add (active, not merged, not disabled)."""
        live = () if self.lora_disabled else tuple(n for n in self.lora_active if n not in self.lora_merged)
        self.lora_live = live
        kinds = [(self.lora_variants[n], self.lora_adapters[n]) for n in live]
        alone_ok = len(live) == 1 or not any(kind.inplace_alone for kind, _ in kinds)
        self.lora_inplace = self.lora_inplace_kind and alone_ok and all(kind.can_inplace(s) for kind, s in kinds)
        fused = (len(kinds) == 1 and self.lora_fusable_kind and self.lora_inplace_kind
                 and kinds[0][0].can_fuse(kinds[0][1]))
        self.lora_fused = live[0] if fused else None

    # ---- forward ----------------------------------------------------------------------------------
    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if self.lora_fused is not None and self.lora_routes is None and not args and not kwargs:
            fused = self.lora_fused_forward(x, self.lora_fused)
            if fused is not None:
                return fused
        base = out = self.lora_base_forward(x, *args, **kwargs)
        if self.lora_routes is not None and not self.lora_disabled:
            return self._lora_routed(x, out)
        if self.lora_inplace and out.is_contiguous() and x.is_floating_point():
            for name in self.lora_live:
                out = self.lora_variants[name].add_inplace_(self, name, out, x, base)
            return out
        for name in self.lora_live:
            out = out + self.lora_term(x, name, base).to(out.dtype)
        return out

    def _lora_routed(self, x: Tensor, out: Tensor) -> Tensor:
        """Each row gets its own adapter's term (layers/routing.py); rows routed to None keep the base output."""
        plan = self.lora_routes
        x, out = plan.fit_rows(x, out, type(self).__name__)
        names = tuple(n for n in plan.distinct if n in self.lora_adapters)
        if not names:
            return out
        if plan.wants_gather(self, names) and routing.can_gather(self, names):
            return plan.add_terms(self, names, x, out)
        base = out
        for name in names:
            rows = plan.rows_of(name, x.device)
            term = self.lora_term(x.index_select(0, rows), name, base.index_select(0, rows))
            out = out.index_add(0, rows, term.to(out.dtype))
        return out

    def lora_term(self, x: Tensor, name: str, base: Tensor | None = None) -> Tensor:
        """What one adapter adds to the base output `base`: scaling * B(A(dropout(x))), as its variant uses it."""
        spec = self.lora_adapters[name]
        A, B = self.lora_A[name], self.lora_B[name]
        if x.is_floating_point() and x.dtype != A.dtype:
            x = x.to(A.dtype)
        dropped = spec.dropout and self.training and x.is_floating_point()  # token ids take no dropout
        if dropped:
            x = F.dropout(x, spec.dropout, training=True)
        h = self.lora_hidden(x, A) * spec.scaling
        lora = self.lora_expand(h, B) if spec.groups is None else self._lora_expand_groups(h, B, spec)
        return self.lora_variants[name].term(self, name, x, lora, base, bool(dropped))

    def _lora_expand_groups(self, h: Tensor, B: Tensor, spec: AdapterSpec) -> Tensor:
        """Each enabled output part gets its own slice of h and B; disabled parts get zeros."""
        parts, g, r = len(spec.groups), spec.n_enabled, spec.r
        per_part = B.shape[0] // g
        y = torch.einsum("...gr,gor->...go", h.unflatten(-1, (g, r)), B.view(g, per_part, r))
        if g == parts:
            return y.flatten(-2)
        out = h.new_zeros(*h.shape[:-1], parts, per_part)
        out[..., [i for i, on in enumerate(spec.groups) if on], :] = y
        return out.flatten(-2)

    # ---- weights ----------------------------------------------------------------------------------
    def lora_delta(self, name: str, dtype: torch.dtype = torch.float32) -> Tensor:
        """The adapter's scaled update B·A laid out like `weight`, computed in `dtype`."""
        return self.lora_weight_layout(self._lora_delta_dense(name, dtype))

    def _lora_delta_dense(self, name: str, dtype: torch.dtype = torch.float32) -> Tensor:
        spec = self.lora_adapters[name]
        A = self.lora_A[name].detach().to(dtype).flatten(1)
        B = self.lora_B[name].detach().to(dtype).flatten(1)
        if spec.groups is None:
            delta = B @ A
        else:
            r, g = spec.r, spec.n_enabled
            per_part = B.shape[0] // g
            delta = A.new_zeros(per_part * len(spec.groups), A.shape[1])
            for j, part in enumerate(i for i, on in enumerate(spec.groups) if on):
                rows = slice(part * per_part, (part + 1) * per_part)
                delta[rows] = B[j * per_part:(j + 1) * per_part] @ A[j * r:(j + 1) * r]
        return delta * spec.scaling

    def lora_merge(self, names: Iterable[str]) -> None:
        """Fold adapters into the weight, through float32, each as its variant's merged update (e.g. DoRA's
        (g - 1)·W + g·ΔW with g = m / ||W + ΔW|| fixed now); several merge at once against the same base weight."""
        names = [n for n in names if n in self.lora_adapters and n not in self.lora_merged]
        if not names:
            return
        if self.lora_merged and any(self.lora_variants[n].merges_against_base for n in (*names, *self.lora_merged)):
            names = [*self.lora_merged, *names]  # such updates are relative to the unmerged weight
            self.lora_unmerge()
        weight = self.lora_dense_weight().detach().float()
        total, kept = self.lora_merged_update(names, weight)
        self._lora_write_weight(weight + total)
        self.lora_merge_state.update(kept)
        self.lora_merged = self.lora_merged + tuple(names)
        self.lora_refresh()

    def lora_merged_update(self, names: Iterable[str], weight: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """What merging `names` adds to the float32 (out, in) `weight` (Σ s·B·A for plain adapters, each
        variant's own update for others), and the per-row factors variants keep for unmerging."""
        total, kept = torch.zeros_like(weight), {}
        for name in names:
            update, factor = self.lora_variants[name].merged_update(self, name, weight, self._lora_delta_dense(name))
            if factor is not None:
                kept[name] = factor
            total += update
        return total, kept

    def lora_unmerge(self) -> None:
        """Recover the base weight: W = (W_merged - Σ c·ΔW) / (1 + Σ (c - 1)), c each variant's row factor."""
        if not self.lora_merged:
            return
        merged = self.lora_dense_weight().detach().float()
        divisor = torch.ones(merged.shape[0], device=merged.device)
        for name in self.lora_merged:
            update, extra = self.lora_variants[name].unmerge_update(self._lora_delta_dense(name),
                                                                   self.lora_merge_state.pop(name, None))
            if extra is not None:
                divisor = divisor + extra
            merged -= update
        self._lora_write_weight(merged / divisor[:, None])
        self.lora_merged = ()
        self.lora_refresh()

    def _lora_write_weight(self, dense: Tensor) -> None:
        """weight = dense (an (out, in) float32 matrix), refusing results that are not finite."""
        weight = self.weight
        result = self.lora_weight_layout(dense).to(weight.dtype)
        if not torch.isfinite(result).all():
            raise LorakitError(
                f"merging into {type(self).__name__} weight ({weight.dtype}) gives non-finite values; "
                "the adapter is too large for this dtype: keep it unmerged or use a wider dtype"
            )
        with torch.no_grad():
            weight.copy_(result)

    # ---- loralib behaviour: eval() merges, train() unmerges -----------------------------------------
    def train(self, mode: bool = True):
        super().train(mode)  # type: ignore[misc]
        if self.lora_merge_on_eval:
            if mode:
                self.lora_unmerge()
            else:
                self.lora_merge(self.lora_active)
        return self


def _init_pair(A: Tensor, B: Tensor, r: int, init: str, zero_A: bool) -> None:
    """Start with B.A = 0 so the adapted model equals the base model."""
    with torch.no_grad():
        if zero_A:
            nn.init.zeros_(A)
            nn.init.normal_(B)
        elif init == "gaussian":
            nn.init.normal_(A, std=1.0 / r)
            nn.init.zeros_(B)
        else:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            nn.init.zeros_(B)


def _accept_loralib_keys(module: LoraLayer, state_dict: dict, prefix: str, *args: Any) -> None:
    """Let `load_state_dict` read loralib's `<layer>.lora_A` keys into the "default" adapter."""
    for kind in LORA_PARAMETER_DICTS:
        key = prefix + kind
        if key in state_dict and "default" in module.lora_adapters:
            state_dict[f"{key}.default"] = state_dict.pop(key)
