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


def test_saving_into_the_working_folder_swaps_it_and_stays_in_it(tmp_path, monkeypatch):
    model, _, _ = _trained_linear()
    (tmp_path / "here").mkdir()
    (tmp_path / "here" / "notes.txt").write_text("mine")
    monkeypatch.chdir(tmp_path / "here")
    lk.save(model, ".")
    lk.save(model, ".")
    assert sorted(os.listdir(".")) == ["adapter_config.json", "adapter_model.safetensors", "notes.txt"]
    assert os.path.samefile(".", tmp_path / "here")


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


# ---- kills at every step of a folder write --------------------------------------------------------------
_STEPS = [(os, "replace"), (os, "rename"), (os, "fsync"), (atomic, "_exchange")]


def _killed_at(k: int, write) -> bool:
    """Run `write` in a forked child that dies (os._exit) at its k-th rename/exchange/fsync; True if it died."""
    pid = os.fork()
    if pid == 0:  # the child: count the calls that change the disk, die at the k-th
        calls = [0]
        for owner, name in _STEPS:
            original = getattr(owner, name)

            def counted(*args, _original=original, **kwargs):
                calls[0] += 1
                if calls[0] == k:
                    os._exit(9)
                return _original(*args, **kwargs)

            setattr(owner, name, counted)
        try:
            write()
        except BaseException:
            os._exit(1)
        os._exit(0)
    deadline = time.monotonic() + 60
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            pytest.fail(f"the writer killed at call {k} hung")
        time.sleep(0.01)
    code = os.waitstatus_to_exitcode(status)
    assert code in (0, 9), f"the writer failed at call {k} (exit {code})"
    return code == 9


def _adapter(r: int, alpha: float, seed: int) -> torch.nn.Module:
    """One base (seed 0) with an adapter of rank r, scaling alpha / r and values drawn from `seed`."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Linear(6, 6))
    base = {k: v.clone() for k, v in model.state_dict().items()}
    lk.inject(model, lk.LoraConfig(r=r, alpha=alpha, target_modules=["0", "1"]))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_()
    return model, base


def _what_load_sees(folder, base: dict, versions: list[torch.nn.Module]) -> int:
    """Which of `versions` lk.load reproduces exactly from `folder` (outputs and tensors)."""
    model = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Linear(6, 6))
    model.load_state_dict(base)
    lk.load(model, folder)
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(1))
    for index, version in enumerate(versions):
        same_tensors = all(torch.equal(a, b) for a, b in zip(lk.adapter_state_dict(model).values(),
                                                             lk.adapter_state_dict(version).values()))
        if same_tensors and lk.adapter_state_dict(model).keys() == lk.adapter_state_dict(version).keys() \
                and torch.equal(model(x), version(x)):
            return index
    pytest.fail(f"{folder} loads as neither the old nor the new adapter")


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_a_kill_at_any_step_of_save_leaves_the_old_or_the_new_adapter(exchange, tmp_path, monkeypatch):
    if not exchange:
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    old, base = _adapter(2, 16, seed=0)
    new, _ = _adapter(4, 32, seed=1)  # another rank, scaling and values on the same base
    folder = tmp_path / "adapter"
    lk.save(old, folder)
    (folder / "tokenizer.json").write_text("{}")  # a user's file beside the adapter survives every save
    seen = []
    for k in range(1, 60):
        died = _killed_at(k, lambda: lk.save(new, folder))
        atomic.recover(folder)  # what the next start does; a no-op when the swap is one rename
        seen.append(_what_load_sees(folder, base, [old, new]))
        assert (folder / "tokenizer.json").read_text() == "{}"
        assert not atomic.temporaries(folder)
        if not died:
            break
        lk.save(old, folder)  # back to the old adapter for the next kill point
    assert seen[-1] == 1 and seen[0] == 0 and len(seen) > 3, seen
    umask = os.umask(0)
    os.umask(umask)
    assert (folder.stat().st_mode & 0o777, (folder / "adapter_config.json").stat().st_mode & 0o777) == \
        (0o777 & ~umask, 0o666 & ~umask)  # as mkdir and open make them, readable by others
    assert seen == sorted(seen)  # old until the swap, new from then on


def test_a_kill_at_any_step_of_a_checkpoint_leaves_complete_checkpoints(tmp_path):
    model, optimizer, scheduler = _trained_linear()
    folder = tmp_path / "checkpoints"
    checkpoint.save(folder, 2, model, optimizer, scheduler, {"history": []})
    for k in range(1, 60):
        died = _killed_at(k, lambda: checkpoint.save(folder, 4, model, optimizer, scheduler, {"history": []}))
        removed = atomic.clean_interrupted(folder)
        assert not any(p.name.startswith(".") for p in folder.iterdir()), removed
        last = checkpoint.latest(folder)
        assert last.name in ("step-2", "step-4")
        checkpoint.restore(last, model, optimizer, scheduler)  # complete: every file reads
        if not died:
            break
        if last.name == "step-4":
            import shutil

            shutil.rmtree(last)
    assert last.name == "step-4" and k > 3
