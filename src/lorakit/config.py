"""LoraConfig: what to adapt and how, validated up front and stored in PEFT's adapter_config layout."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import LorakitError

BIAS_MODES = ("none", "all", "lora_only")
INIT_METHODS = ("kaiming", "gaussian", "pissa")
PISSA_NITER = re.compile(r"pissa_niter_(\d+)")  # also valid: PiSSA by torch.svd_lowrank, k power iterations (PEFT's)

# Default targets per `config.model_type`, the modules PEFT adapts for the same architecture.
ARCHITECTURE_TARGETS: dict[str, list[str]] = {
    "gpt2": ["c_attn"],
    "gpt_bigcode": ["c_attn"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "phi3": ["qkv_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "deberta": ["in_proj"],
    "deberta-v2": ["query_proj", "value_proj"],
    "distilbert": ["q_lin", "v_lin"],
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neo": ["q_proj", "v_proj"],
    "bloom": ["query_key_value"],
    "falcon": ["query_key_value"],
    "mpt": ["Wqkv"],
    "stablelm": ["q_proj", "v_proj"],
}


@dataclass
class LoraConfig:
    """Hyper-parameters of one adapter. Fields and defaults are public API (README.md); where PEFT has the same
    setting the meaning is PEFT's, so its adapter_config.json maps onto these fields."""

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    bias: str = "none"
    init: str = "kaiming"
    use_rslora: bool = False
    use_dora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    modules_to_save: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        _check_rank("r", self.r)
        _check_alpha("alpha", self.alpha)
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise LorakitError(f"dropout must be a number in [0, 1), got {self.dropout!r}")
        self.target_modules = _check_names("target_modules", self.target_modules)
        self.exclude_modules = _check_names("exclude_modules", self.exclude_modules)
        if self.bias not in BIAS_MODES:
            raise LorakitError(f"bias must be one of {BIAS_MODES}, got {self.bias!r}")
        if self.init not in INIT_METHODS and not (isinstance(self.init, str) and PISSA_NITER.fullmatch(self.init)):
            raise LorakitError(f"init must be one of {INIT_METHODS} or 'pissa_niter_<k>', got {self.init!r}")
        for flag in ("use_rslora", "use_dora"):
            if not isinstance(getattr(self, flag), bool):
                raise LorakitError(f"{flag} must be True or False, got {getattr(self, flag)!r}")
        self.rank_pattern = _check_pattern("rank_pattern", self.rank_pattern, _check_rank)
        self.alpha_pattern = _check_pattern("alpha_pattern", self.alpha_pattern, _check_alpha)
        if isinstance(self.modules_to_save, str) or not all(isinstance(m, str) for m in self.modules_to_save or []):
            raise LorakitError(f"modules_to_save must be a list of module names, got {self.modules_to_save!r}")
        self.modules_to_save = list(self.modules_to_save or [])

    def rank_for(self, module_name: str) -> int:
        """The rank of `module_name`: the first rank_pattern entry matching its name, else r."""
        return pattern_value(self.rank_pattern, module_name, self.r)

    def alpha_for(self, module_name: str) -> float:
        return pattern_value(self.alpha_pattern, module_name, self.alpha)

    def replace(self, **changes: Any) -> "LoraConfig":
        return dataclasses.replace(self, **changes)


def lora_scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
    """The factor on B·A: alpha / r (LoRA), or alpha / sqrt(r) with rsLoRA (Kalajdzievski, 2023)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def pattern_matches(pattern: str, module_name: str) -> bool:
    """PEFT's rule for rank/alpha patterns: the regex matches the whole name or a dotted suffix of it."""
    try:
        return re.fullmatch(rf"(?:.*\.)?(?:{pattern})", module_name) is not None
    except re.error as exc:  # a pattern read from a file, not yet checked by LoraConfig
        raise LorakitError(f"{pattern!r} is not a valid regular expression ({exc}); fix it in rank_pattern / "
                           "alpha_pattern") from None


def pattern_value(patterns: dict[str, Any], module_name: str, default: Any) -> Any:
    """The value of the first pattern matching `module_name`, else `default`."""
    for pattern, value in patterns.items():
        if pattern_matches(pattern, module_name):
            return value
    return default


def _check_rank(what: str, r: Any) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise LorakitError(f"{what} must be an integer >= 1, got {r!r}")


def _check_alpha(what: str, alpha: Any) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0 or not math.isfinite(alpha):
        raise LorakitError(f"{what} must be a finite number > 0, got {alpha!r}")


def _check_names(what: str, names: Any) -> list[str] | str | None:
    if names is None:
        return None
    if isinstance(names, str):
        _compile(what, names)
        return names
    if isinstance(names, (list, tuple, set)) and all(isinstance(n, str) for n in names):
        if not names:
            raise LorakitError(f"{what} is empty; give module names, a regex string, or None")
        return sorted(names) if isinstance(names, set) else list(names)
    raise LorakitError(f"{what} must be a list of module names, a regex string, or None; got {names!r}")


def _check_pattern(what: str, patterns: Any, check_value) -> dict:
    if not isinstance(patterns, dict):
        raise LorakitError(f"{what} must be a dict of regex -> value, got {type(patterns).__name__}")
    for pattern, value in patterns.items():
        _compile(what, pattern)
        check_value(f"{what}[{pattern!r}]", value)
    return dict(patterns)


def _compile(what: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise LorakitError(f"{what}: {pattern!r} is not a valid regular expression ({exc})") from None
