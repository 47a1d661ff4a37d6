"""Load a pretrained base model and its tokenizer from local files, and save plain Hugging Face folders.

lorakit never downloads at run time: every load is offline, from "default" (SmolLM2-135M-Instruct, the GGUF
in the asset cache), a .gguf file, a Hugging Face folder, or one .safetensors file with its config.json
beside it. transformers needs ~20 s to parse and dequantize the default GGUF but well under a second to
open a safetensors folder, so the first "default" load converts the GGUF once into a folder in the cache.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any

import torch

from lorakit.errors import FormatError, LorakitError

DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the embedded default's public id on the hub
TASKS = {
    "causal-lm": "AutoModelForCausalLM",
    "sequence-classification": "AutoModelForSequenceClassification",
    "classification": "AutoModelForSequenceClassification",  # the name `lorakit train --task` uses
}
WEIGHT_FILES = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
EXPECTED = (
    "expected 'default', a .gguf file, a Hugging Face folder (config.json with model.safetensors or "
    "pytorch_model.bin, or their sharded index), or a .safetensors file with a config.json beside it"
)


def load_base_model(
    source: str | os.PathLike = "default",
    dtype: torch.dtype = torch.float32,
    *,
    task: str | type = "causal-lm",
    **config_overrides: Any,
) -> tuple[Any, Any]:
    """(model, tokenizer) from local files only; tokenizer is None when the folder has no tokenizer files.

    `task` is a key of TASKS or a transformers Auto class (e.g. AutoModelForSequenceClassification);
    `config_overrides` go to the model config (e.g. num_labels=2 for a new classification head).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    auto = _auto_class(task)
    if str(source) == "default":
        model, tokenizer = _load_hf_folder(default_folder(), auto, dtype, config_overrides)
        model.config.name_or_path = DEFAULT_MODEL_ID  # what adapters record as their base, not the cache folder
        return model, tokenizer
    path = Path(source).expanduser()
    if not path.exists():
        raise LorakitError(f"No model at {path}: {EXPECTED}.")
    if path.is_file() and path.suffix == ".gguf":
        return _load_gguf(path, auto, dtype, config_overrides)
    if path.is_file() and path.suffix == ".safetensors":
        return _load_safetensors_file(path, auto, dtype, config_overrides)
    if path.is_dir() and (path / "config.json").is_file() and any((path / f).is_file() for f in WEIGHT_FILES):
        return _load_hf_folder(path, auto, dtype, config_overrides)
    found = sorted(p.name for p in path.iterdir())[:12] if path.is_dir() else [path.name]
    raise LorakitError(f"Cannot tell what model {path} holds (found {found}): {EXPECTED}.")


def load_config(source: str | os.PathLike = "default") -> Any:
    """The transformers config of "default", a Hugging Face folder, a .safetensors file or a .gguf file,
    without reading any weight."""
    from transformers import AutoConfig

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if str(source) == "default":
        return AutoConfig.from_pretrained(default_folder(), local_files_only=True)
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return AutoConfig.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    folder = path.parent if path.is_file() else path
    if not (folder / "config.json").is_file():
        raise LorakitError(f"No config.json for {path}: expected 'default', a Hugging Face folder, a "
                           ".safetensors file with config.json beside it, or a .gguf file.")
    return AutoConfig.from_pretrained(folder, local_files_only=True)


def save_hf_folder(model: Any, tokenizer: Any, out_dir: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """Write `model` (and `tokenizer`, unless None) as a safetensors folder plain transformers loads.

    Each file is written under a temporary name and renamed, so a reader never sees half a file. `dtype`
    casts the saved weights only; the model in memory is left as it is.
    """
    if not hasattr(model, "save_pretrained"):
        raise LorakitError(f"save_hf_folder needs a transformers PreTrainedModel, got {type(model).__name__}.")
    lora_keys = [k for k in model.state_dict() if any(part.startswith("lora_") for part in k.split("."))]
    if lora_keys:
        raise LorakitError(
            f"The model still holds LoRA layers ({lora_keys[0]}, ...), which plain transformers cannot load: "
            "fold them in with lk.unload(model, merge=True) first, or save only the adapter with lk.save."
        )
    out = Path(out_dir).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_dir_beside(out)
    try:
        _save_pretrained(model, tokenizer, tmp, dtype)
        if not out.exists():
            os.rename(tmp, out)
            return out
        for f in tmp.iterdir():
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _auto_class(task: str | type) -> Any:
    if not isinstance(task, str):
        return task
    if task not in TASKS:
        raise LorakitError(f"Unknown task {task!r}: choose one of {sorted(TASKS)} or pass a transformers Auto class.")
    import transformers

    return getattr(transformers, TASKS[task])


def default_folder() -> Path:
    """The default GGUF converted to a safetensors folder, made on first use; keyed by the GGUF's hash."""
    from lorakit.assets import MODEL, cache_dir, default_model_path

    gguf = default_model_path()
    folder = cache_dir() / f"{Path(MODEL.name).stem}.{MODEL.sha256[:12]}-hf"
    if (folder / "config.json").is_file():
        return folder
    print(f"lorakit: converting {gguf.name} to a safetensors folder, once (about 20 s) ...", file=sys.stderr)
    from transformers import AutoModelForCausalLM

    model, tokenizer = _load_gguf(gguf, AutoModelForCausalLM, torch.float32, {})
    tmp = _temp_dir_beside(folder)
    try:
        _save_pretrained(model, tokenizer, tmp, None)
        os.rename(tmp, folder)  # atomic: the folder appears complete or not at all
    except OSError:
        if not (folder / "config.json").is_file():  # else another process converted it first
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _temp_dir_beside(path: Path) -> Path:
    """An empty folder next to `path` (same file system, so renames are atomic), made under the umask."""
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def _load_hf_folder(folder: Path, auto: Any, dtype: torch.dtype, overrides: dict) -> tuple[Any, Any]:
    from .quant.hf_folder import is_quantized_folder, load_quantized

    if is_quantized_folder(folder):  # written by `lorakit quantize` or transformers + bitsandbytes
        return load_quantized(folder, auto), _load_tokenizer(folder)
    model = auto.from_pretrained(folder, dtype=dtype, local_files_only=True, **overrides)
    return model, _load_tokenizer(folder)


def _load_gguf(path: Path, auto: Any, dtype: torch.dtype, overrides: dict) -> tuple[Any, Any]:
    from transformers import AutoTokenizer

    kwargs = dict(gguf_file=path.name, local_files_only=True)
    try:  # transformers 5 may keep GGUF blocks packed in its own layers; LoRA needs plain dense ones
        from transformers import GgufConfig

        dense = {"quantization_config": GgufConfig(dequantize=True)}
    except ImportError:  # older releases always dequantize
        dense = {}
    model = auto.from_pretrained(path.parent, dtype=dtype, **dense, **kwargs, **overrides)
    return model, AutoTokenizer.from_pretrained(path.parent, **kwargs)


def _load_safetensors_file(path: Path, auto: Any, dtype: torch.dtype, overrides: dict) -> tuple[Any, Any]:
    from safetensors.torch import load_file
    from transformers import AutoConfig

    if not (path.parent / "config.json").is_file():
        found = sorted(p.name for p in path.parent.iterdir())[:12]
        raise LorakitError(
            f"{path} needs the model's config.json beside it to know the architecture (found {found}): "
            "copy the config.json of the model it was saved from into that folder."
        )
    config = AutoConfig.from_pretrained(path.parent, local_files_only=True, **overrides)
    model = auto.from_config(config, dtype=dtype)
    try:
        state = load_file(path)
    except Exception as err:  # safetensors raises its own error types for truncated or foreign files
        raise FormatError(f"{path} is not a readable safetensors file ({err}).") from err
    _load_state(model, state, path)
    return model.eval(), _load_tokenizer(path.parent)


def _load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """load_state_dict that accepts a tied weight saved under one name only and names every other gap."""
    own = model.state_dict(keep_vars=True)
    mismatched = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
                  if k in own and v.shape != own[k].shape]
    if mismatched:
        raise FormatError(f"{path} does not fit the config.json beside it: shapes (file vs model) {mismatched[:5]}.")
    missing, unexpected = model.load_state_dict(state, strict=False)
    loaded = {id(own[k]) for k in state if k in own}
    missing = [k for k in missing if id(own[k]) not in loaded]
    if missing or unexpected:
        raise FormatError(
            f"{path} does not fit the model its config.json describes: {len(missing)} missing keys "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}). Was it saved from "
            "another model, or with a key prefix (such as a PEFT adapter file)?"
        )


def _load_tokenizer(folder: Path) -> Any:
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def _save_pretrained(model: Any, tokenizer: Any, folder: Path, dtype: torch.dtype | None) -> None:
    model.save_pretrained(folder, state_dict=None if dtype is None else _cast_state(model, dtype))
    if dtype is not None:  # save_pretrained records the dtype of the model in memory, not of the file
        config_path = folder / "config.json"
        config = json.loads(config_path.read_text())
        config["dtype"] = str(dtype).removeprefix("torch.")
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def _cast_state(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Floating tensors cast to dtype; a tied weight keeps only its first name, as transformers saves it."""
    state, seen = {}, set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            tensor = tensor.detach()
            state[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    return state
