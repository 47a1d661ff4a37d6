"""Training checkpoints: trainable tensors, optimizer, scheduler, RNG and data position, written atomically.

A checkpoint is a folder `step-N` built under a temporary name and swapped into place as one unit
(atomic.atomic_folder), so a folder with that name is always complete; resuming picks the highest one.

Nothing in it can run code when read: tensors are in safetensors files and everything else is JSON
(`state_codec`), never pickle. Checkpoints of older lorakit versions (`trainer_state.pt`, a pickle) are
refused with an explanation instead of being unpickled.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .. import atomic
from ..errors import FormatError
from . import state_codec

TENSORS = "trainable.safetensors"  # the trainable parameters by name
STATE_TENSORS = "state.safetensors"  # optimizer moments and RNG states
STATE = "trainer_state.json"  # everything else, plus where each state tensor goes
PICKLED_STATE = "trainer_state.pt"  # what lorakit <= 0.x wrote; never loaded


def save(folder: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
         scheduler: Any, extra: dict[str, Any], keep: int = 2) -> Path:
    target = folder / f"step-{step}"
    state = {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "rng": _rng_state(), "extra": extra}
    tree, tensors = state_codec.encode(state)
    with atomic.atomic_folder(target) as staging:
        trainable = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(trainable, staging / TENSORS)
        save_file(tensors, staging / STATE_TENSORS)
        (staging / STATE).write_text(json.dumps(tree, allow_nan=False))
    for old in sorted(_complete(folder), key=_step_of)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def remove_leftovers(folder: Path) -> list[Path]:
    """Temporary folders of checkpoint writes a kill interrupted (`.step-N.*`, also older versions' names)."""
    removed = atomic.clean_interrupted(folder)
    for item in sorted(folder.glob(".step-*")) if folder.is_dir() else []:
        if item.is_dir():
            shutil.rmtree(item, ignore_errors=True)
        else:
            item.unlink(missing_ok=True)
        removed.append(item)
    return removed


def latest(folder: Path) -> Path | None:
    found = sorted(_complete(folder), key=_step_of)
    if not found and folder.is_dir() and any(folder.glob(f"step-*/{PICKLED_STATE}")):
        raise FormatError(f"{folder} holds checkpoints of an older lorakit ({PICKLED_STATE}, a pickle that can run "
                          "code when loaded); they are not read. Start a new run, or delete them to train afresh.")
    return found[-1] if found else None


def read_state(path: Path) -> dict[str, Any]:
    """The checkpoint's non-parameter state: {"step", "optimizer", "scheduler", "rng", "extra"}."""
    try:
        tree = json.loads((path / STATE).read_text())
        return state_codec.decode(tree, load_file(path / STATE_TENSORS))
    except Exception as exc:  # a damaged checkpoint can fail in many ways
        raise _unreadable(path, exc) from None


def restore(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
            state: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load a checkpoint into the live objects; returns {"step": .., "extra": ..}."""
    state = state if state is not None else read_state(path)
    try:
        tensors = load_file(path / TENSORS)
    except Exception as exc:
        raise _unreadable(path, exc) from None
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(tensors):
        raise FormatError(f"{path}: holds {len(tensors)} trainable tensors, the model has {len(params)}; "
                          "it belongs to another configuration (start a new --out or drop --resume)")
    for name, param in params.items():
        if tensors[name].shape != param.shape:
            raise FormatError(f"{path}: {name} is {tuple(tensors[name].shape)} in the checkpoint, "
                              f"{tuple(param.shape)} in the model; it belongs to another configuration")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(tensors[name])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    return {"step": state["step"], "extra": state["extra"]}


def _unreadable(path: Path, exc: Exception) -> FormatError:
    return FormatError(f"{path}: checkpoint is unreadable ({exc}); delete it to resume from an earlier one")


def _complete(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return [p for p in folder.glob("step-*") if p.is_dir() and (p / STATE).is_file()]


def _step_of(path: Path) -> int:
    return int(path.name.split("-", 1)[1])


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
