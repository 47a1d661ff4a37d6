"""Reading training rows: .jsonl/.json/.csv/.parquet files, a Hugging Face `datasets.Dataset`, or a list of
dicts, kept with where each row came from (file and line) so every later error can point at it.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lorakit.errors import LorakitError

Row = dict[str, Any]


class Rows(list):
    """A list of rows that remembers their source and, for files, the line each row starts on."""

    def __init__(self, rows: Iterable[Row] = (), source: str = "data", lines: Sequence[int] | None = None) -> None:
        super().__init__(rows)
        self.source = source
        self.lines = list(lines) if lines is not None else None

    def subset(self, indices: Sequence[int]) -> Rows:
        """These rows, in this order, still pointing at their lines in the source."""
        lines = [self.lines[i] for i in indices] if self.lines is not None else None
        return Rows([self[i] for i in indices], self.source, lines)


def describe_row(records: Sequence[Row], index: int, origin: str | None = None) -> str:
    """How an error names a row: "train.jsonl line 40" for a file, else "<origin> row <index>"."""
    if isinstance(records, Rows):
        if records.lines is not None:
            return f"{records.source} line {records.lines[index]}"
        return f"{records.source} row {index}"
    return f"{origin or 'data'} row {index}"


def load_records(source: str | Path | Sequence[Mapping[str, Any]] | Any) -> Rows:
    """Rows from a .jsonl/.json/.csv/.parquet file, a Hugging Face `datasets.Dataset`, or a list of dicts."""
    if isinstance(source, (str, Path)):
        return _load_file(Path(source))
    if hasattr(source, "column_names"):  # a datasets.Dataset, duck-typed so `datasets` stays optional
        return _from_dataset(source)
    if isinstance(source, Sequence):
        return _as_rows(source, where="the list")
    raise LorakitError(
        f"cannot read training data from a {type(source).__name__}; pass a file path (.jsonl, .json, .csv, "
        ".parquet), a datasets.Dataset, or a list of dicts."
    )


def _load_file(path: Path) -> Rows:
    if not path.is_file():
        problem = "is a folder" if path.is_dir() else "does not exist"
        raise LorakitError(f"{path} {problem}; pass a .jsonl, .json, .csv or .parquet file (check the path).")
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise LorakitError(f"{path}: unknown data file type {path.suffix!r}; use .jsonl (or .json), .csv or .parquet.")
    try:
        return _as_rows(*reader(path), where=str(path))
    except UnicodeDecodeError as err:
        raise LorakitError(f"{path} is not UTF-8 text (byte {err.start}); save it as UTF-8.") from None


def _read_jsonl(path: Path) -> tuple[list[Any], list[int] | None]:
    return _parse_lines(path.read_text(encoding="utf-8-sig"), path)


def _read_json(path: Path) -> tuple[list[Any], list[int] | None]:
    """A JSON list of objects, or one object per line under a .json name (as `datasets` accepts both)."""
    text = path.read_text(encoding="utf-8-sig")
    if not text.lstrip().startswith("["):
        return _parse_lines(text, path)
    try:
        return json.loads(text), None  # errors name a list item as "row <index>"
    except json.JSONDecodeError as err:
        raise LorakitError(
            f"{path} line {err.lineno}: invalid JSON ({err.msg}); the file must hold one list of objects, "
            "or one object per line."
        ) from None


def _parse_lines(text: str, path: Path) -> tuple[list[Any], list[int]]:
    # Split on "\n" only: JSON strings may hold U+2028 and other characters that str.splitlines breaks on.
    rows, lines = [], []
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
            lines.append(number)
        except json.JSONDecodeError as err:
            raise LorakitError(
                f"{path} line {number}: invalid JSON ({err.msg}, column {err.colno}); each line must be one "
                'JSON object such as {"text": "..."}.'
            ) from None
    return rows, lines


def _read_csv(path: Path) -> tuple[list[Any], list[int]]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        rows, lines = [], []
        try:
            start = 2  # line 1 is the header
            for row in reader:
                rows.append(row)
                lines.append(start)
                start = reader.line_num + 1  # a quoted cell may span lines
            return rows, lines
        except csv.Error as err:
            raise LorakitError(f"{path} line {reader.line_num}: not valid CSV ({err}); fix the quoting.") from None


def _read_parquet(path: Path) -> tuple[list[Any], list[int] | None]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise LorakitError(f"reading {path} needs pyarrow, which is not installed: pip install pyarrow") from None
    try:
        return pq.read_table(path).to_pylist(), None
    except (pa.ArrowException, OSError) as err:
        raise LorakitError(f"{path} is not a readable Parquet file ({err}); rewrite it or use JSONL.") from None


_READERS: dict[str, Callable[[Path], tuple[list[Any], list[int] | None]]] = {
    ".jsonl": _read_jsonl,
    ".json": _read_json,
    ".csv": _read_csv,
    ".parquet": _read_parquet,
}


def _from_dataset(dataset: Any) -> Rows:
    if isinstance(dataset.column_names, Mapping):
        splits = ", ".join(map(str, dataset.column_names))
        raise LorakitError(f"got a DatasetDict with splits {splits}; pass one split, e.g. data['train'].")
    return _as_rows(dataset.to_list() if hasattr(dataset, "to_list") else dataset, where="the dataset")


def _as_rows(items: Iterable[Any], lines: list[int] | None = None, where: str = "data") -> Rows:
    rows = Rows(items, where, lines)
    if not rows:
        raise LorakitError(f"{where} holds no rows; training needs at least one (is the file empty?).")
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise LorakitError(
                f'{describe_row(rows, i)} is a {type(row).__name__}, not an object with fields such as {{"text": ...}}.'
            )
    return Rows([dict(row) for row in rows], where, lines)


