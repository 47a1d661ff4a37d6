"""Training checkpoints: trainable tensors, optimizer, scheduler, RNG and data position, written atomically.

A checkpoint is a folder `step-N` built under a temporary name and renamed into place, so a folder with
that name is always complete; resuming picks the highest one.
"""

from __future__ import annotations

import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import FormatError

TENSORS = "trainable.safetensors"
STATE = "trainer_state.pt"


def save(folder: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
         scheduler: Any, extra: dict[str, Any], keep: int = 2) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"step-{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step-{step}.", dir=folder))
    try:
        tensors = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(tensors, tmp / TENSORS)
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng": _rng_state(), "extra": extra}, tmp / STATE)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in sorted(_complete(folder), key=_step_of)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def latest(folder: Path) -> Path | None:
    found = sorted(_complete(folder), key=_step_of)
    return found[-1] if found else None


def restore(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> dict[str, Any]:
    """Load a checkpoint into the live objects; returns {"step": .., "extra": ..}."""
    try:
        tensors = load_file(path / TENSORS)
        state = torch.load(path / STATE, map_location="cpu", weights_only=False)
    except Exception as exc:  # a damaged checkpoint can fail in many ways
        raise FormatError(f"{path}: checkpoint is unreadable ({exc}); delete it to resume from an earlier one") from None
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(tensors):
        raise FormatError(f"{path}: holds {len(tensors)} trainable tensors, the model has {len(params)}; "
                          "it belongs to another configuration (start a new --out or drop --resume)")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(tensors[name])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    return {"step": state["step"], "extra": state["extra"]}


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
