"""Every adapter_config.json key lorakit knows, in one place: the ones it reads, the ones that cannot change
what a file computes, and the ones it accepts only at the value that changes nothing.

Anything else is refused with its name, so an option that changes the computation is never skipped silently.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

from ..errors import FormatError

# Read and applied by the loader.
READ = ("peft_type", "r", "lora_alpha", "lora_dropout", "bias", "use_rslora", "use_dora", "rank_pattern",
        "alpha_pattern", "modules_to_save", "init_lora_weights")

# Cannot change what the file computes: its tensors already say which modules are adapted and how.
HARMLESS = {
    "task_type": "the model class is the caller's; classification heads come through modules_to_save",
    "base_model_name_or_path": "a label; the tensors are checked against the model",
    "revision": "a hub revision of the base, a label",
    "inference_mode": "training or not is the caller's choice",
    "auto_mapping": "PEFT's record of the base class",
    "peft_version": "PEFT's version stamp",
    "target_modules": "the tensors say which modules are adapted",
    "exclude_modules": "the tensors say which modules are adapted",
    "layers_to_transform": "the tensors say which modules are adapted",
    "layers_pattern": "the tensors say which modules are adapted",
    "fan_in_fan_out": "lorakit knows each layer's weight layout",
    "megatron_core": "a module name used only with megatron_config",
    "loftq_config": "used only with init_lora_weights='loftq' (refused)",
    "eva_config": "used only to start training (init_lora_weights='eva'); the file holds the trained A and B",
    "corda_config": "used only with init_lora_weights='corda' (refused)",
    "lora_ga_config": "used only with init_lora_weights='lora_ga' (refused)",
    "qalora_group_size": "used only with use_qalora (refused unless false)",
    "runtime_config": "PEFT's runtime settings (GPU offload), not part of the adapter",
}


def _empty(value: Any) -> bool:
    return value is None or value is False or value == [] or value == {}


# Accepted only at the value that changes nothing; any other value is refused with the reason.
DEFAULT_ONLY: dict[str, tuple[Callable[[Any], bool], str]] = {
    "lora_bias": (_empty, "PEFT's bias on lora_B is not supported by lorakit's layers"),
    "alora_invocation_tokens": (_empty, "activated LoRA (the adapter acts only from the invocation tokens on) "
                                        "is not supported"),
    "target_parameters": (_empty, "adapters on parameters rather than modules (e.g. MoE experts) are not supported"),
    "trainable_token_indices": (_empty, "PEFT's trainable-token deltas are not supported; merge them into the "
                                        "embedding with PEFT first"),
    "layer_replication": (_empty, "layer replication changes the base model's layer stack, which lorakit does "
                                  "not rebuild"),
    "use_qalora": (_empty, "QA-LoRA (pooled inputs on GPTQ bases) is not supported"),
    "megatron_config": (_empty, "Megatron parallel layers are not supported"),
    "use_bdlora": (_empty, "block-diagonal LoRA is not supported"),
    "arrow_config": (_empty, "Arrow routing between adapters is not supported"),
    "kasa_config": (_empty, "KaSA (singular-value-adapted LoRA) is not supported"),
    "monteclora_config": (_empty, "MonteCLoRA is not supported"),
    "ensure_weight_tying": (_empty, "tied adapters on tied embeddings are not supported"),
    "velora_config": (_empty, "VeLoRA is a PEFT layer variant lorakit does not implement"),
}

# init_lora_weights values whose file holds the whole update against the unmodified base.
PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")
# Values whose file assumes a base that the method changed at initialisation (or another forward).
REFUSED_INITS = {
    "olora": "OLoRA trains against a base changed by a QR decomposition; convert it where it was trained "
             "(PEFT: save_pretrained(path_initial_model_for_weight_conversion=...))",
    "corda": "CorDA trains against a base changed by a data-dependent decomposition; convert it where it was "
             "trained (PEFT: save_pretrained(path_initial_model_for_weight_conversion=...))",
    "loftq": "LoftQ trains against a base replaced by its own quantization; merge it with PEFT instead",
    "lora_ga": "LoRA-GA trains against a base changed by its gradient-based initialisation; merge it with PEFT",
    "mica": "MiCA computes a different forward (a PEFT layer variant)",
}
PISSA_NITER = re.compile(r"pissa_niter_\d+")


def check_keys(config: dict[str, Any], path: Path) -> None:
    """Refuse (naming every offending key) a config that uses anything lorakit would otherwise ignore."""
    problems = []
    for key, value in config.items():
        if key in READ or key in HARMLESS or key.startswith("lorakit_"):
            continue
        if key in DEFAULT_ONLY:
            ok, why = DEFAULT_ONLY[key]
            if not ok(value):
                problems.append(f"{key} is {value!r}: {why}")
            continue
        problems.append(f"{key} is {value!r}: an option lorakit does not know; it may change what the adapter "
                        "computes, so the file is refused (load it with the tool that wrote it)")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() in REFUSED_INITS:
        problems.append(f"init_lora_weights is {init!r}: {REFUSED_INITS[init.lower()]}")
    elif isinstance(init, str) and PISSA_NITER.fullmatch(init):
        problems.append(f"init_lora_weights is {init!r}: the tensors go with a residual from a randomized SVD that "
                        "cannot be repeated; convert the adapter where it was trained (PEFT: save_pretrained("
                        "path_initial_model_for_weight_conversion=...); lorakit: lk.save)")
    elif init not in PLAIN_INITS and init != "pissa" and not (isinstance(init, str) and init.lower() in REFUSED_INITS):
        problems.append(f"init_lora_weights is {init!r}: an initialisation lorakit does not know")
    if problems:
        raise FormatError(f"{path}: this adapter uses options lorakit does not support:\n  " + "\n  ".join(problems))
