"""Training-data formats: which one rows are in (by their fields), which task it trains, and a check of
every row's fields before anything is tokenized.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lorakit.errors import LorakitError

from .records import Row, describe_row

# In detection order: the first format whose fields all occur in the data wins.
FIELDS: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "text_label": ("text", "label"),
    "text": ("text",),
}
FORMAT_TASKS = {"text": "causal-lm", "prompt_completion": "causal-lm", "messages": "causal-lm",
                "text_label": "classification"}  # the task each format trains


def detect_format(records: Sequence[Row], origin: str = "data") -> str:
    """The format whose fields occur in the rows, after checking that every row has them.

    Fields are collected over all rows, so a row that lacks one is reported by index rather than making
    the whole data set unrecognizable. `origin` (e.g. the file name) prefixes error messages.
    """
    _require_rows(records, origin)
    present = set().union(*(row.keys() for row in records))
    for fmt, fields in FIELDS.items():
        if present.issuperset(fields):
            check_rows(records, fmt, origin)
            return fmt
    found = ", ".join(sorted(str(name) for name in present)) or "none"
    raise LorakitError(
        f"{origin}: cannot tell the format from the fields ({found}); rows need 'text', 'prompt' + "
        "'completion', 'messages', or 'text' + 'label'. Rename the columns."
    )


def infer_task(fmt: str) -> str:
    """'causal-lm' or 'classification': which model head and loss the format trains."""
    fields_of(fmt)
    return FORMAT_TASKS[fmt]


def check_rows(records: Sequence[Row], fmt: str, origin: str = "data") -> None:
    """Raise on the first row that lacks one of the format's fields or holds a value of the wrong kind."""
    fields = fields_of(fmt)
    _require_rows(records, origin)
    for i, row in enumerate(records):
        where = describe_row(records, i, origin)
        for name in fields:
            if row.get(name) is None:
                raise LorakitError(
                    f"{where} is missing field {name!r} (the {fmt} format needs {' + '.join(fields)}); "
                    "fill it in or remove the row."
                )
            _check_value(row[name], name, where)


def _require_rows(records: Sequence[Row], origin: str) -> None:
    if not records:
        raise LorakitError(f"{origin} holds no rows; training needs at least one.")


def fields_of(fmt: str) -> tuple[str, ...]:
    if fmt not in FIELDS:
        raise LorakitError(f"unknown data format {fmt!r}; choose one of {', '.join(FIELDS)}.")
    return FIELDS[fmt]


def _check_value(value: Any, name: str, where: str) -> None:
    if name == "messages":
        _check_messages(value, where)
    elif name == "label":
        if not isinstance(value, (str, int)):
            raise LorakitError(f"{where}: 'label' must be a string or an integer, got {type(value).__name__}.")
    elif not isinstance(value, str):
        raise LorakitError(f"{where}: {name!r} must be a string, got {type(value).__name__}.")


def _check_messages(messages: Any, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        hint = " (a CSV cell cannot hold a list: use JSONL or Parquet)" if isinstance(messages, str) else ""
        raise LorakitError(
            f'{where}: \'messages\' must be a non-empty list of {{"role", "content"}} objects, got '
            f"{type(messages).__name__}{hint}."
        )
    for k, message in enumerate(messages):
        if not (
            isinstance(message, Mapping)
            and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)
        ):
            raise LorakitError(f"{where} message {k} needs a string 'role' and 'content', got {message!r:.80}.")
    if not any(message["role"] == "assistant" for message in messages):
        raise LorakitError(f"{where} has no assistant message, so nothing to learn from; add one or drop the row.")


