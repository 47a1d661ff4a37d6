"""The one adapter core every base kind shares: adapter parameters, scaling, forward, delta, merge/unmerge.

A LoRA layer is the user's own module with its class swapped for a subclass that mixes in `LoraLayer`,
so parameter names (`q_proj.weight`) and isinstance checks stay as they were and no wrapper module adds
a call to every forward. A base kind (Linear, Conv1D, Embedding, Conv) supplies only four small hooks:
the adapter shapes, how the input reaches rank space, how rank space reaches the output, and how a dense
(out, in) delta is laid out like its weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import LorakitError
from . import dora, lean, routing

LORA_ATTRIBUTES = (
    "lora_adapters", "lora_active", "lora_merged", "lora_live", "lora_disabled", "lora_merge_on_eval", "lora_routes",
    "lora_dora_scale", "lora_dora_cache", "lora_lean",
)
LORA_PARAMETER_DICTS = ("lora_A", "lora_B")
LORA_MODULES = (*LORA_PARAMETER_DICTS, "lora_magnitude")


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
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r

    @property
    def n_enabled(self) -> int:
        return sum(self.groups) if self.groups else 1


class LoraLayer:
    """Mixin holding any number of named adapters on a base layer; see the module docstring."""

    lora_base_class: ClassVar[type[nn.Module]]
    lora_zero_init_A: ClassVar[bool] = False  # embeddings start from A = 0, B random (PEFT's choice)
    lora_merge_blocker: ClassVar[str | None] = None  # why this kind cannot merge in place, if it cannot
    lora_supports_dora: ClassVar[bool] = False
    lora_lean_kind: ClassVar[bool] = False  # plain x·Aᵀ·Bᵀ adapters on a base whose output may be updated in place

    lora_A: nn.ParameterDict
    lora_B: nn.ParameterDict
    lora_magnitude: nn.ParameterDict  # DoRA's per-output magnitude m, for adapters with use_dora
    lora_dora_scale: dict[str, Tensor]  # m / ||W + ΔW|| fixed when a DoRA adapter was merged
    lora_dora_cache: dict[str, tuple[tuple[int, ...], Tensor]]  # weight norms while nothing changes
    lora_adapters: dict[str, AdapterSpec]
    lora_active: tuple[str, ...]
    lora_merged: tuple[str, ...]
    lora_live: tuple[str, ...]
    lora_lean: bool  # every live adapter can take the in-place path of layers/lean.py
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

    # ---- set-up -----------------------------------------------------------------------------------
    def lora_setup(self, merge_on_eval: bool = False) -> None:
        """Give a freshly swapped (or constructed) module empty adapter state."""
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_magnitude = nn.ParameterDict()
        self.lora_dora_scale = {}
        self.lora_dora_cache = {}
        self.lora_adapters = {}
        self.lora_active = ()
        self.lora_merged = ()
        self.lora_live = ()
        self.lora_lean = False
        self.lora_disabled = False
        self.lora_merge_on_eval = merge_on_eval
        self.lora_routes = None
        self._register_load_state_dict_pre_hook(_accept_loralib_keys, with_module=True)

    def lora_teardown(self) -> None:
        """Remove every trace of lorakit and restore the original class."""
        for name in LORA_MODULES:
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
        shape_a, shape_b = self.lora_shapes(spec)
        weight = self.lora_reference_weight()
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        A = torch.empty(shape_a, device=weight.device, dtype=dtype)
        B = torch.empty(shape_b, device=weight.device, dtype=dtype)
        _init_pair(A, B, spec.r, init, self.lora_zero_init_A)
        if spec.use_dora:
            if not self.lora_supports_dora or spec.groups is not None:
                raise LorakitError(f"DoRA (use_dora) applies to linear layers, not {type(self).__name__}")
            norms = self.lora_dense_weight().detach().float().norm(dim=1)  # B = 0: m starts at ||W||
            self.lora_magnitude[name] = nn.Parameter(norms.to(device=weight.device, dtype=dtype))
        self.lora_A[name] = nn.Parameter(A)
        self.lora_B[name] = nn.Parameter(B)
        self.lora_adapters[name] = spec

    def lora_delete(self, name: str) -> None:
        if name in self.lora_magnitude:
            del self.lora_magnitude[name]
        del self.lora_A[name], self.lora_B[name], self.lora_adapters[name]
        self.lora_active = tuple(n for n in self.lora_active if n != name)
        self.lora_refresh()

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
        specs = [self.lora_adapters[n] for n in live]
        plain = all(s.groups is None and not s.use_dora for s in specs)
        lone_dora = len(specs) == 1 and specs[0].use_dora  # DoRA rescales the base output: no other term in it
        self.lora_lean = self.lora_lean_kind and (plain or lone_dora)

    # ---- forward ----------------------------------------------------------------------------------
    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        base = out = self.lora_base_forward(x, *args, **kwargs)
        if self.lora_routes is not None and not self.lora_disabled:
            return self._lora_routed(x, out)
        if self.lora_lean and out.is_contiguous() and x.is_floating_point():
            for name in self.lora_live:
                spec, A, B = self.lora_adapters[name], self.lora_A[name], self.lora_B[name]
                dropout = spec.dropout if self.training else 0.0
                if not spec.use_dora:
                    out = lean.add_lora_(out, x, A, B, spec.scaling, dropout)
                elif not dropout and out.dtype == lean.compute_dtype(x, A):
                    norm = self._lora_weight_norm(name)
                    out = lean.add_dora_(out, x, A, B, spec.scaling, self.lora_magnitude[name], norm,
                                         getattr(self, "bias", None))
                else:  # DoRA with dropout rescales W·dropout(x), which only the general path computes
                    out = out + self.lora_term(x, name, base).to(out.dtype)
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
            return routing.gathered(self, plan, names, x, out)
        base = out
        for name in names:
            rows = plan.rows_of(name, x.device)
            term = self.lora_term(x.index_select(0, rows), name, base.index_select(0, rows))
            out = out.index_add(0, rows, term.to(out.dtype))
        return out

    def lora_term(self, x: Tensor, name: str, base: Tensor | None = None) -> Tensor:
        """What one adapter adds to the base output `base`: scaling * B(A(dropout(x))), or DoRA's term."""
        spec = self.lora_adapters[name]
        A, B = self.lora_A[name], self.lora_B[name]
        if x.is_floating_point() and x.dtype != A.dtype:
            x = x.to(A.dtype)
        dropped = spec.dropout and self.training and x.is_floating_point()  # token ids take no dropout
        if dropped:
            x = F.dropout(x, spec.dropout, training=True)
        h = self.lora_hidden(x, A) * spec.scaling
        lora = self.lora_expand(h, B) if spec.groups is None else self._lora_expand_groups(h, B, spec)
        if not spec.use_dora:
            return lora
        if dropped:  # DoRA rescales W·x; with dropout, PEFT rescales W·dropout(x)
            base_no_bias = F.linear(x, self.lora_dense_weight().to(x.dtype))
        else:
            bias = getattr(self, "bias", None)
            base_no_bias = base if bias is None else base - bias.to(base.dtype)
        return dora.output(base_no_bias, lora, self.lora_magnitude[name], self._lora_weight_norm(name))

    def _lora_weight_norm(self, name: str) -> Tensor:
        """||W + s·B·A|| per output row; reused while W, A and B are unchanged (e.g. in inference)."""
        A, B = self.lora_A[name], self.lora_B[name]
        key = (A._version, B._version, self.lora_reference_weight()._version, A.data_ptr(), B.data_ptr())
        cached = self.lora_dora_cache.get(name)
        if cached is not None and cached[0] == key:
            return cached[1]
        norm = dora.weight_norm(self.lora_dense_weight(), A.detach(), B.detach(), self.lora_adapters[name].scaling)
        self.lora_dora_cache[name] = (key, norm)
        return norm

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
        """Fold adapters into the weight, through float32. A DoRA adapter adds (g - 1)·W + g·ΔW with
        g = m / ||W + ΔW|| fixed now; several merge at once against the same base weight."""
        names = [n for n in names if n in self.lora_adapters and n not in self.lora_merged]
        if not names:
            return
        if self.lora_merged and any(self.lora_adapters[n].use_dora for n in (*names, *self.lora_merged)):
            names = [*self.lora_merged, *names]  # DoRA scales are relative to the unmerged weight
            self.lora_unmerge()
        weight = self.lora_dense_weight().detach().float()
        total, scales = self.lora_merged_update(names, weight)
        self._lora_write_weight(weight + total)
        self.lora_dora_scale.update(scales)
        self.lora_merged = self.lora_merged + tuple(names)
        self.lora_refresh()

    def lora_merged_update(self, names: Iterable[str], weight: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """What merging `names` adds to the float32 (out, in) `weight`: Σ s·B·A, and for DoRA adapters
        (g - 1)·W + g·s·B·A with g = m / ||W + s·B·A||; also each DoRA adapter's g (for unmerging)."""
        total, scales = torch.zeros_like(weight), {}
        for name in names:
            delta = self._lora_delta_dense(name)
            if self.lora_adapters[name].use_dora:
                spec, A, B = self.lora_adapters[name], self.lora_A[name].detach(), self.lora_B[name].detach()
                norm = dora.weight_norm(weight, A, B, spec.scaling)
                scales[name] = self.lora_magnitude[name].detach().float() / norm
                delta = dora.merged_delta(weight, delta, scales[name])
            total += delta
        return total, scales

    def lora_unmerge(self) -> None:
        """Recover the base weight: W = (W_merged - Σ ΔW_plain - Σ g·ΔW_dora) / (1 + Σ (g - 1))."""
        if not self.lora_merged:
            return
        merged = self.lora_dense_weight().detach().float()
        divisor = torch.ones(merged.shape[0], device=merged.device)
        for name in self.lora_merged:
            delta = self._lora_delta_dense(name)
            scale = self.lora_dora_scale.pop(name, None)
            if scale is not None:
                delta, divisor = scale[:, None] * delta, divisor + scale - 1
            merged -= delta
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
