"""PEFT's adapter folder layout: file names and how tensor keys name modules and their LoRA tensors."""

from __future__ import annotations

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
BASE_LAYER = "base_layer"  # PEFT's name for the wrapped module: `<module>.base_layer.bias`
LORA_SUFFIXES = {"lora_A.weight": "A", "lora_B.weight": "B", "lora_embedding_A": "A", "lora_embedding_B": "B",
                 "lora_magnitude_vector": "M"}
LORA_BIAS_SUFFIXES = ("lora_B.bias", "lora_embedding_B.bias")  # PEFT's lora_bias=True


def lora_key(module: str, kind: str, embedding: bool) -> str:
    """The file key of one LoRA tensor: kind "A", "B" or "M" (DoRA's magnitude)."""
    if kind == "M":
        return f"{PREFIX}{module}.lora_magnitude_vector"
    return f"{PREFIX}{module}.lora_embedding_{kind}" if embedding else f"{PREFIX}{module}.lora_{kind}.weight"


def base_key(module: str, param: str, adapted: bool) -> str:
    """The file key of a base-model tensor (a trained bias): PEFT puts adapted modules' own tensors under base_layer."""
    path = f"{module}.{BASE_LAYER}" if adapted else module
    return f"{PREFIX}{path}.{param}" if path else f"{PREFIX}{param}"


def split_lora_key(key: str) -> tuple[str, str | None]:
    """'x.q_proj.lora_A.weight' -> ('x.q_proj', 'A'); also PEFT's older keys with the adapter name left in
    ('x.q_proj.lora_A.default.weight'); (key, None) for anything that is not a LoRA tensor."""
    for suffix, kind in LORA_SUFFIXES.items():
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], kind
        head, _, tail = key.rpartition(".")
        stem = suffix.split(".")[0]
        if tail == "weight" and head.rsplit(".", 1)[0].endswith("." + stem):
            return head.rsplit(".", 1)[0][: -len(stem) - 1], kind
    return key, None
