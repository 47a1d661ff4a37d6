"""A training run's folder (`--out`): one owner at a time, one run per folder, checked before a model loads.

    run.json          what the run is (settings, model and data fingerprints); `--resume` compares it
    metrics.jsonl     one strict-JSON record per step, written by this run only
    checkpoints/      step-N folders, each swapped in whole (train/checkpoint.py)
    adapter/          the final adapter and tokenizer, swapped in as one unit
    model/            full fine-tuning: the whole trained model and tokenizer (instead of adapter/)
    curves.png        loss and metric curves
    .lorakit.lock     locked (flock) while a process trains here; holds the holder's pid, host and start

A new run needs an empty or new folder; `--resume` continues the run the folder holds when run.json
matches; `--overwrite` deletes an earlier run's files first. Leftovers of writes a kill interrupted are
cleaned up when a run starts.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from .. import atomic
from ..assets import sha256_file
from ..errors import LorakitError
from ..version import __version__
from . import checkpoint
from .loop import RESUMABLE_CHANGES
from .metrics import METRICS

RUN_FILE = "run.json"
LOCK_FILE = ".lorakit.lock"
RUN_ENTRIES = (RUN_FILE, METRICS, "checkpoints", "adapter", "model", "curves.png")
# Settings a resumed run may change: they steer evaluation, saving, speed and where it runs, not what is learned.
# The model and data are compared by fingerprint, so a moved file still resumes.
MAY_CHANGE_ON_RESUME = ("out", "resume", "overwrite", "dry_run", "nproc", "eval_size", "model", "data",
                        *RESUMABLE_CHANGES)


class RunLock:
    """An exclusive flock on `.lorakit.lock`; the kernel drops it when the holder dies, so a killed run's lock
    is simply taken over. The file is never deleted: deleting a locked file would let two processes lock
    two different files of the same name."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / LOCK_FILE
        self.fd: int | None = None
        self.previous: dict[str, Any] | None = None

    def acquire(self) -> RunLock:
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(_read_holder(fd))
            os.close(fd)
            raise LorakitError(f"{self.path.parent} is in use by another `lorakit train` ({holder}); wait for it to "
                               "finish or stop it, or train into another --out") from None
        self.previous = _read_holder(fd)  # a dead run's entry, if it was killed
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)  # closing drops the flock
            self.fd = None


def _read_holder(fd: int) -> dict[str, Any] | None:
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"null")
    except ValueError:
        return None


def _describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "holder unknown"
    return f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"


def open_run(out: Path, job: dict[str, Any], resume: bool, overwrite: bool,
             say: Callable[[str], None] = print) -> RunLock:
    """Check and lock `out` for the run described by `job` (see `describe_job`); returns the held lock."""
    atomic.check_writable_folder(out, "--out")
    lock = RunLock(out).acquire()
    try:
        if lock.previous:
            say(f"took over the lock of a run that ended without releasing it ({_describe(lock.previous)})")
        removed = atomic.clean_interrupted(out) + checkpoint.remove_leftovers(out / "checkpoints")
        if removed:
            say(f"removed {len(removed)} leftovers of interrupted writes: {', '.join(p.name for p in removed)}")
        _claim(out, job, resume, overwrite)
    except BaseException:
        lock.release()
        raise
    return lock


def _claim(out: Path, job: dict[str, Any], resume: bool, overwrite: bool) -> None:
    present = sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE and not p.name.startswith(".write-test."))
    foreign = [name for name in present if name not in RUN_ENTRIES]
    if foreign:
        raise LorakitError(f"--out {out} holds files that are not a lorakit run ({', '.join(foreign[:5])}); "
                           "train into an empty or new folder")
    if resume:
        saved = read_run(out)
        if saved is None:
            raise LorakitError(f"--resume: {out} holds no run ({RUN_FILE} is missing); train without --resume")
        changed = differences(saved["job"], job)
        if changed:
            raise LorakitError(f"--resume: the run in {out} was trained with other settings ({'; '.join(changed)}); "
                               "resume with the same settings, or start a new --out")
        return
    if present and not overwrite:
        saved = read_run(out)
        what = f"a run started {saved.get('created')}" if saved else f"an earlier run ({', '.join(present)})"
        raise LorakitError(f"--out {out} already holds {what}; pass --resume to continue it, --overwrite to replace "
                           "it, or choose another --out")
    for name in present:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink()
    run = {"lorakit": __version__, "created": time.strftime("%Y-%m-%d %H:%M:%S %z"), "job": job}
    atomic.write_text(out / RUN_FILE, json.dumps(run, indent=2, sort_keys=True) + "\n")


def read_run(out: Path) -> dict[str, Any] | None:
    path = out / RUN_FILE
    if not path.is_file():
        return None
    try:
        run = json.loads(path.read_text())
        run["job"]  # noqa: B018 - the one entry every run.json has
        return run
    except (ValueError, KeyError, TypeError):
        raise LorakitError(f"{path} is damaged; start a new --out (or --overwrite this one)") from None


def differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'name: was X, now Y' for every setting that differs (MAY_CHANGE_ON_RESUME excepted)."""
    names = sorted((set(saved) | set(current)) - set(MAY_CHANGE_ON_RESUME))
    return [f"{name}: was {saved.get(name)!r}, now {current.get(name)!r}" for name in names
            if saved.get(name) != current.get(name)]


def describe_job(settings: dict[str, Any]) -> dict[str, Any]:
    """What makes a run this run: its settings plus fingerprints of the model and data files, as JSON."""
    job = json.loads(json.dumps(settings, default=str))
    job["model_files"] = fingerprint(settings["model"], model=True)
    job["data_sha256"] = fingerprint(settings["data"])
    return job


def fingerprint(spec: str | None, model: bool = False) -> str | None:
    """sha256 of a data file; for a model, of its config and weight sizes (hashing gigabytes takes too long)."""
    if spec in (None, "default"):
        return spec
    path = Path(spec).expanduser()
    if not path.exists():
        return None
    if path.is_file() and not model:
        return sha256_file(path)
    files = sorted(path.iterdir()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for item in files:
        if item.is_file():
            digest.update(f"{item.name}:{item.stat().st_size}\n".encode())
            if item.suffix == ".json":
                digest.update(item.read_bytes())
    return digest.hexdigest()


def save_with_fallback(write: Callable[[Path], None], target: Path) -> Path:
    """Write the trained adapter with `write(folder)` into `target`; if that fails (a full disk, a folder gone
    read-only), into a rescue folder, and raise an error that says where the adapter is."""
    try:
        write(target)
        return target
    except OSError as first:
        problem = f"could not save the adapter to {target} ({first.strerror or first})"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    tried = []
    for root in (Path(tempfile.gettempdir()), Path.home() / ".cache" / "lorakit"):
        rescue = root / f"lorakit-rescued-{stamp}-{os.getpid()}" / "adapter"
        try:
            write(rescue)
        except OSError as exc:
            tried.append(f"{rescue} ({exc.strerror or exc})")
            continue
        raise LorakitError(f"{problem}; the trained adapter was saved to {rescue} instead: move it where you want it "
                           "once there is space (lk.load and lorakit merge read it from there)")
    raise LorakitError(f"{problem}, nor to {', '.join(tried)}; free some space and --resume from the last "
                       "checkpoint (--save-every)")
