"""Crash-safe writes: files and whole folders are built under a temporary name, fsynced, then renamed into
place, so a reader (or a process started after a kill) finds the old version or the new one, never a mix.

Folders are swapped with Linux's renameat2(RENAME_EXCHANGE), one atomic step. Where that call is missing
(another OS, a file system without it) the swap takes two renames; a kill between them leaves the old folder
under `.<name>.old-*`, and `recover` (run at the next start, see `clean_interrupted`) puts it back.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

NEW, OLD = "new", "old"  # temporary-name tags: `.<name>.new-XXXX` is being built, `.<name>.old-XXXX` leaves


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Either the old file or the complete new one is at `path`, never a partial write."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fchmod(handle.fileno(), _mode(0o666))  # mkstemp's 0600 would hide the file from other users
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, keep_other_files: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; when the block ends without an error, it replaces
    `path` as one unit (on an error it is deleted and `path` is untouched).

    keep_other_files: entries of the old folder that the block did not write are carried into the new one
    (hard links where possible), so saving an adapter into a folder keeps e.g. the user's tokenizer files.
    """
    path = Path(os.path.abspath(path))  # "." must name the folder, so it has a parent to build beside it
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "exists and is not a folder", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.{NEW}-", dir=path.parent))
    try:
        os.chmod(staging, _mode(0o777))  # as mkdir would make it, not mkdtemp's 0700
        yield staging
        if keep_other_files and path.is_dir():
            _carry_over(path, staging)
        _fsync_tree(staging)
        _swap_in(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def check_writable_folder(path: str | os.PathLike, what: str) -> None:
    """`path` is (or can be made) a folder this process can write files in; else a LorakitError naming `what`."""
    from .errors import LorakitError

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise LorakitError(f"{what} {path} is a file, not a folder; choose a folder path")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test."):
            pass
    except OSError as exc:
        raise LorakitError(f"{what} {path} is not writable ({exc.strerror or exc}); choose a folder you can write "
                           "to, or fix its permissions") from None


def temporaries(path: str | os.PathLike) -> list[Path]:
    """Leftovers of interrupted writes of `path`: `.<name>.new-*`, `.<name>.old-*` and file temporaries."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    return sorted(p for p in path.parent.glob(f".{path.name}.*")
                  if p.name.startswith((f".{path.name}.{NEW}-", f".{path.name}.{OLD}-")) or p.suffix == ".tmp")


def recover(path: str | os.PathLike) -> list[Path]:
    """Finish what a kill interrupted at `path`, then delete its temporaries; returns what was removed.

    Call it only while no other process writes `path` (e.g. under the run folder's lock)."""
    path = Path(path)
    leftovers = temporaries(path)
    if not path.exists():
        old = [p for p in leftovers if p.name.startswith(f".{path.name}.{OLD}-") and p.is_dir()]
        if old:  # killed between the two renames of the fallback swap: the old folder is complete
            os.rename(old[0], path)
            leftovers.remove(old[0])
    for item in leftovers:
        if item.is_dir() and not item.is_symlink():
            shutil.rmtree(item, ignore_errors=True)
        else:
            item.unlink(missing_ok=True)
    return leftovers


def clean_interrupted(folder: str | os.PathLike) -> list[Path]:
    """`recover` every target in `folder` whose write was interrupted; returns the temporaries removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    targets = set()
    for item in folder.glob(".*.*"):
        name = item.name[1:].removesuffix(".tmp") if item.suffix == ".tmp" else item.name[1:]
        if item.suffix == ".tmp" or f".{NEW}-" in item.name or f".{OLD}-" in item.name:
            targets.add(name.rsplit(".", 1)[0])
    removed = []
    for name in sorted(targets):
        removed += recover(folder / name)
    return removed


def _swap_in(staging: Path, path: Path) -> None:
    cwd = os.getcwd()
    if not path.exists():
        os.rename(staging, path)
    elif _exchange(staging, path):  # staging now holds the old folder
        shutil.rmtree(staging, ignore_errors=True)
    else:
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.{OLD}-", dir=path.parent))
        os.rename(path, old)  # replaces the empty placeholder
        os.rename(staging, path)
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(path.parent)
    if Path(cwd) == path or path in Path(cwd).parents:  # the process stood in the old folder: step into the new
        os.chdir(cwd if os.path.isdir(cwd) else path)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (renameat2 RENAME_EXCHANGE); False where the system cannot."""
    renameat2 = getattr(_libc(), "renameat2", None) if os.name == "posix" else None
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EPERM):
        return False  # the file system or kernel lacks the flag
    raise OSError(code, os.strerror(code), str(b))


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _carry_over(old: Path, new: Path) -> None:
    for item in old.iterdir():
        target = new / item.name
        if target.exists() or target.is_symlink():
            continue
        if item.is_dir() and not item.is_symlink():
            shutil.copytree(item, target, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(item, target)


def _link_or_copy(source: str | os.PathLike, target: str | os.PathLike) -> None:
    try:
        os.link(source, target, follow_symlinks=False)
    except OSError:
        shutil.copy2(source, target, follow_symlinks=False)


def _mode(full: int) -> int:
    """`full` less the process's umask: the permissions a plain open() or mkdir() would give."""
    umask = os.umask(0)
    os.umask(umask)
    return full & ~umask


def _fsync_tree(folder: Path) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(root))


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not every platform opens folders
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
