"""A run's folder over its life: code-free checkpoints, whole-folder swaps under kills, one owner at a time."""

from __future__ import annotations

import json
import os
import pickle
import random
import signal
import time

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import lorakit as lk
from lorakit import atomic
from lorakit.train import checkpoint, state_codec


class _WritesMarker:
    """A pickle payload that, if unpickled, runs code: it writes a marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _optimizer_and_scheduler(model: torch.nn.Module):
    from lorakit.optim import warmup_cosine

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    return optimizer, warmup_cosine(optimizer, 2, 10)


def _trained_linear() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["0"]))
    optimizer, scheduler = _optimizer_and_scheduler(model)
    for _ in range(3):
        model(torch.randn(2, 4)).square().sum().backward()
        optimizer.step()
        scheduler.step()
    return model, optimizer, scheduler


def test_a_pickled_trainer_state_is_never_unpickled(tmp_path):
    marker = tmp_path / "marker"
    step = tmp_path / "checkpoints" / "step-2"
    step.mkdir(parents=True)
    save_file({"x": torch.zeros(1)}, step / checkpoint.TENSORS)
    (step / checkpoint.PICKLED_STATE).write_bytes(pickle.dumps({"optimizer": _WritesMarker(str(marker))}))
    with pytest.raises(lk.LorakitError, match="older lorakit"):
        checkpoint.latest(tmp_path / "checkpoints")
    assert not marker.exists()
    # the same payload planted next to a valid checkpoint is ignored, never opened
    model, optimizer, scheduler = _trained_linear()
    saved = checkpoint.save(tmp_path / "checkpoints", 3, model, optimizer, scheduler, {"history": []})
    (saved / checkpoint.PICKLED_STATE).write_bytes(pickle.dumps(_WritesMarker(str(marker))))
    checkpoint.restore(checkpoint.latest(tmp_path / "checkpoints"), model, optimizer, scheduler)
    assert not marker.exists()


def test_checkpoint_files_are_safetensors_and_strict_json(tmp_path):
    model, optimizer, scheduler = _trained_linear()
    saved = checkpoint.save(tmp_path, 3, model, optimizer, scheduler, {"history": [{"loss": float("nan")}]})
    assert sorted(p.name for p in saved.iterdir()) == sorted([checkpoint.TENSORS, checkpoint.STATE_TENSORS,
                                                              checkpoint.STATE])
    json.loads((saved / checkpoint.STATE).read_text(), parse_constant=pytest.fail)  # no bare NaN
    for name in (checkpoint.TENSORS, checkpoint.STATE_TENSORS):
        assert (saved / name).read_bytes()[8:9] == b"{"  # a safetensors header, not a zip/pickle


def test_state_round_trips_exactly(tmp_path):
    model, optimizer, scheduler = _trained_linear()
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng":
             {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
             "odd": {1: (2.5, float("inf")), "s": [None, True]}}
    tree, tensors = state_codec.encode(state)
    path = tmp_path / "t.safetensors"
    save_file(tensors, path)
    from safetensors.torch import load_file

    back = state_codec.decode(json.loads(json.dumps(tree, allow_nan=False)), load_file(path))
    assert back["rng"]["python"] == state["rng"]["python"]
    np_state, np_back = state["rng"]["numpy"], back["rng"]["numpy"]
    assert np_back[0] == np_state[0] and np.array_equal(np_back[1], np_state[1]) and np_back[2:] == np_state[2:]
    assert torch.equal(back["rng"]["torch"], state["rng"]["torch"])
    assert back["odd"] == state["odd"] and back["scheduler"] == state["scheduler"]
    assert back["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    for k, moments in state["optimizer"]["state"].items():
        for name, value in moments.items():
            assert torch.equal(back["optimizer"]["state"][k][name], value)
    with pytest.raises(ValueError, match="unknown entry kind"):
        state_codec.decode({"__kind__": "object", "module": "os", "name": "system"}, {})
