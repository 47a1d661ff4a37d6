"""Training data shared by `lorakit train` and the library trainer: read rows, recognize their format,
tokenize them with loss masks, batch them in a resumable, shardable order.

Formats, recognized by their fields:

    text               {"text"}                  causal LM, loss on every token
    prompt_completion  {"prompt", "completion"}  causal LM, loss on the completion (and its EOS) only
    messages           {"messages": [{"role", "content"}, ...]}
                                                 chat rendered by the tokenizer's chat template, loss on the
                                                 assistant turns only
    text_label         {"text", "label"}         sequence classification

Causal-LM sequences start with BOS when the tokenizer adds one by default and end with EOS (text, completion);
a chat template writes its own special tokens. A prompt and its completion are tokenized separately and
concatenated: the boundary is exact, and the prompt's tokens are the ones the model will see at inference,
when the prompt is tokenized alone.

Rows longer than max_length are truncated, counted (`TokenizedData.n_truncated`) and reported in one warning:

    text, messages     cut on the right (later chat turns go first).
    prompt_completion  the completion survives: the prompt loses tokens from its left (BOS stays). A completion
                       longer than max_length - 1 tokens is cut on the right, so that at least one prompt token
                       (or BOS) precedes it and its first token is still a prediction target.
    text_label         cut on the right, keeping the tokenizer's special tokens (e.g. [CLS] ... [SEP]).

Rows left with no token to learn from (a chat whose assistant turns were all cut off) are dropped and counted.

Batch order is a pure function of (n_examples, batch_size, seed, epoch), so a resumed run recomputes it and
skips the batches it has done. `shard` cuts each global batch into world_size contiguous parts, so world_size
processes with batch B / world_size each see exactly the global batches of one process with batch B.
"""

from __future__ import annotations

import csv
import json
import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorakit.errors import LorakitError

IGNORE_INDEX = -100  # label of a position without loss, as torch's cross_entropy and transformers expect

# In detection order: the first format whose fields all occur in the data wins.
FIELDS: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "text_label": ("text", "label"),
    "text": ("text",),
}
TASKS = {"text": "causal-lm", "prompt_completion": "causal-lm", "messages": "causal-lm", "text_label": "classification"}
TRUNCATION = {
    "text": "cut on the right",
    "prompt_completion": "prompt cut on the left so the completion survives",
    "messages": "cut on the right",
    "text_label": "cut on the right",
}
_GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")
_INTEGER = re.compile(r"[+-]?\d+")

Row = dict[str, Any]
Encoded = tuple[list[int], list[int], bool]  # input_ids, labels, truncated


# ---------------------------------------------------------------- reading rows


def load_records(source: str | Path | Sequence[Mapping[str, Any]] | Any) -> list[Row]:
    """Rows from a .jsonl/.json/.csv/.parquet file, a Hugging Face `datasets.Dataset`, or a list of dicts."""
    if isinstance(source, (str, Path)):
        return _load_file(Path(source))
    if hasattr(source, "column_names"):  # a datasets.Dataset, duck-typed so `datasets` stays optional
        return _from_dataset(source)
    if isinstance(source, Sequence):
        return _as_rows(source, "the list")
    raise LorakitError(
        f"cannot read training data from a {type(source).__name__}; pass a file path (.jsonl, .json, .csv, "
        ".parquet), a datasets.Dataset, or a list of dicts."
    )


def _load_file(path: Path) -> list[Row]:
    if not path.is_file():
        problem = "is a folder" if path.is_dir() else "does not exist"
        raise LorakitError(f"{path} {problem}; pass a .jsonl, .json, .csv or .parquet file (check the path).")
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise LorakitError(f"{path}: unknown data file type {path.suffix!r}; use .jsonl (or .json), .csv or .parquet.")
    try:
        return _as_rows(reader(path), str(path))
    except UnicodeDecodeError as err:
        raise LorakitError(f"{path} is not UTF-8 text (byte {err.start}); save it as UTF-8.") from None


def _read_jsonl(path: Path) -> list[Any]:
    return _parse_lines(path.read_text(encoding="utf-8-sig"), path)


def _read_json(path: Path) -> list[Any]:
    """A JSON list of objects, or one object per line under a .json name (as `datasets` accepts both)."""
    text = path.read_text(encoding="utf-8-sig")
    if not text.lstrip().startswith("["):
        return _parse_lines(text, path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise LorakitError(
            f"{path} line {err.lineno}: invalid JSON ({err.msg}); the file must hold one list of objects, "
            "or one object per line."
        ) from None


def _parse_lines(text: str, path: Path) -> list[Any]:
    # Split on "\n" only: JSON strings may hold U+2028 and other characters that str.splitlines breaks on.
    rows = []
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise LorakitError(
                f"{path} line {number}: invalid JSON ({err.msg}, column {err.colno}); each line must be one "
                'JSON object such as {"text": "..."}.'
            ) from None
    return rows


def _read_csv(path: Path) -> list[Any]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        try:
            return list(reader)
        except csv.Error as err:
            raise LorakitError(f"{path} line {reader.line_num}: not valid CSV ({err}); fix the quoting.") from None


def _read_parquet(path: Path) -> list[Any]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise LorakitError(f"reading {path} needs pyarrow, which is not installed: pip install pyarrow") from None
    try:
        return pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as err:
        raise LorakitError(f"{path} is not a readable Parquet file ({err}); rewrite it or use JSONL.") from None


_READERS: dict[str, Callable[[Path], list[Any]]] = {
    ".jsonl": _read_jsonl,
    ".json": _read_json,
    ".csv": _read_csv,
    ".parquet": _read_parquet,
}


def _from_dataset(dataset: Any) -> list[Row]:
    if isinstance(dataset.column_names, Mapping):
        splits = ", ".join(map(str, dataset.column_names))
        raise LorakitError(f"got a DatasetDict with splits {splits}; pass one split, e.g. data['train'].")
    return _as_rows(dataset.to_list() if hasattr(dataset, "to_list") else dataset, "the dataset")


def _as_rows(items: Iterable[Any], where: str) -> list[Row]:
    rows = list(items)
    if not rows:
        raise LorakitError(f"{where} holds no rows; training needs at least one (is the file empty?).")
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise LorakitError(
                f'{where} row {i} is a {type(row).__name__}, not an object with fields such as {{"text": ...}}.'
            )
    return [dict(row) for row in rows]


# ---------------------------------------------------------------- formats


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
    _fields(fmt)
    return TASKS[fmt]


def check_rows(records: Sequence[Row], fmt: str, origin: str = "data") -> None:
    """Raise on the first row that lacks one of the format's fields or holds a value of the wrong kind."""
    fields = _fields(fmt)
    _require_rows(records, origin)
    for i, row in enumerate(records):
        where = f"{origin} row {i}"
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


def _fields(fmt: str) -> tuple[str, ...]:
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


# ---------------------------------------------------------------- tokenization


@dataclass
class TokenizedData:
    """Examples ready for `collate`, and what tokenization had to change to make them.

    A causal-LM example is {"input_ids", "labels"} (labels IGNORE_INDEX where there is no loss); a
    classification example is {"input_ids", "label"} with label in 0..len(label_names) - 1. `source_rows`
    holds each example's row index in the input, which differs from its position once rows are dropped.
    """

    fmt: str
    examples: list[dict[str, Any]]
    source_rows: list[int]
    n_truncated: int = 0
    n_dropped: int = 0
    label_names: list[Any] | None = None

    @property
    def task(self) -> str:
        return infer_task(self.fmt)

    def __len__(self) -> int:
        return len(self.examples)


def tokenize(
    records: Sequence[Row], tokenizer: Any, fmt: str, max_length: int, label_names: Sequence[Any] | None = None
) -> TokenizedData:
    """Token ids and loss targets of every row (see the module docstring for the truncation policy).

    `label_names` fixes the classes of text_label data (e.g. to match a trained head); by default they are
    the labels that occur, sorted (integers and integer strings numerically).
    """
    check_rows(records, fmt)
    _check_int("max_length", max_length, 2)
    if label_names is not None and fmt != "text_label":
        raise LorakitError(f"label_names applies to text_label data only, not {fmt}; leave it out.")
    if fmt == "text_label":
        data = _classification(records, tokenizer, max_length, label_names)
    else:
        data = _causal(fmt, _CAUSAL[fmt](records, tokenizer, max_length))
    _warn_changes(data, len(records), max_length)
    return data


def _causal(fmt: str, encoded: list[Encoded]) -> TokenizedData:
    kept = [i for i, (_, labels, _) in enumerate(encoded) if _has_target(labels)]
    if not kept:
        raise LorakitError("no row has a token to learn from after truncation; raise max_length.")
    examples = [{"input_ids": encoded[i][0], "labels": encoded[i][1]} for i in kept]
    n_truncated = sum(truncated for *_, truncated in encoded)
    return TokenizedData(fmt, examples, kept, n_truncated, n_dropped=len(encoded) - len(kept))


def _has_target(labels: list[int]) -> bool:
    """Position 0 is never predicted (nothing precedes it), so a target must sit at position 1 or later."""
    return any(label != IGNORE_INDEX for label in labels[1:])


def _warn_changes(data: TokenizedData, n_rows: int, max_length: int) -> None:
    notes = []
    if data.n_truncated:
        notes.append(
            f"{data.n_truncated} of {n_rows} rows were longer than max_length={max_length} tokens and were "
            f"truncated ({TRUNCATION[data.fmt]}); raise max_length to keep them whole."
        )
    if data.n_dropped:
        notes.append(f"Dropped {data.n_dropped} rows left with no token to learn from.")
    if notes:
        warnings.warn(" ".join(notes), stacklevel=3)


def _encode(tokenizer: Any, texts: list[str], special: bool = False, max_length: int | None = None) -> list[list[int]]:
    """Token ids of many texts in one call (fast tokenizers batch them in Rust)."""
    out = tokenizer(texts, add_special_tokens=special, truncation=max_length is not None, max_length=max_length)
    return [list(ids) for ids in out["input_ids"]]


def _bos(tokenizer: Any) -> list[int]:
    """[BOS] when the tokenizer puts it in front of text by default (Llama does, GPT-2 does not), else []."""
    bos = tokenizer.bos_token_id
    return [bos] if bos is not None and tokenizer("a")["input_ids"][:1] == [bos] else []


def _eos(tokenizer: Any) -> list[int]:
    return [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]


def _text(records: Sequence[Row], tokenizer: Any, max_length: int) -> list[Encoded]:
    bos, eos = _bos(tokenizer), _eos(tokenizer)
    encoded = []
    for body in _encode(tokenizer, [row["text"] for row in records]):
        ids = bos + body + eos
        encoded.append((ids[:max_length], ids[:max_length], len(ids) > max_length))
    return encoded


def _prompt_completion(records: Sequence[Row], tokenizer: Any, max_length: int) -> list[Encoded]:
    bos, eos = _bos(tokenizer), _eos(tokenizer)
    prompts = _encode(tokenizer, [row["prompt"] for row in records])
    completions = _encode(tokenizer, [row["completion"] for row in records])
    encoded = []
    for prompt_body, completion_body in zip(prompts, completions):
        prompt, completion = bos + prompt_body, completion_body + eos
        kept_completion = completion[: max_length - 1]
        kept_prompt = _keep_tail(prompt, max_length - len(kept_completion), head=len(bos))
        labels = [IGNORE_INDEX] * len(kept_prompt) + kept_completion
        encoded.append((kept_prompt + kept_completion, labels, len(prompt) + len(completion) > max_length))
    return encoded


def _keep_tail(ids: list[int], n: int, head: int) -> list[int]:
    """`ids` cut from the left to at most n tokens, its first `head` tokens (BOS) kept in place."""
    if len(ids) <= n:
        return ids
    head = min(head, n)
    return ids[:head] + ids[len(ids) - (n - head) :]


def _messages(records: Sequence[Row], tokenizer: Any, max_length: int) -> list[Encoded]:
    """Chats rendered by the tokenizer's template, loss on the assistant turns.

    A template with {% generation %} tags marks the assistant tokens itself. Otherwise an assistant turn
    spans from the end of the rendered conversation before it (with the generation prompt, i.e. the assistant
    header) to the end of the rendered conversation through it, so its end-of-turn tokens are learned too.
    Spans are in characters and mapped to tokens by their offsets, so a token merge across a boundary cannot
    shift them. Where a template renders prefixes inconsistently (e.g. it rewrites earlier turns), the spans
    fall back to the assistant messages' text, found in order in the rendering.
    """
    template = _chat_template(tokenizer)
    if not tokenizer.is_fast:
        raise LorakitError("the messages format needs a fast tokenizer (token offsets); load it with use_fast=True.")
    tagged = bool(_GENERATION_TAG.search(template))
    encoded, n_inexact = [], 0
    for i, row in enumerate(records):
        where = f"row {i}"
        if tagged:
            ids, mask = _tagged_mask(tokenizer, row["messages"], where)
        else:
            ids, mask, exact = _prefix_mask(tokenizer, row["messages"], where)
            n_inexact += not exact
        labels = [token if keep else IGNORE_INDEX for token, keep in zip(ids, mask)]
        encoded.append((ids[:max_length], labels[:max_length], len(ids) > max_length))
    if n_inexact:
        warnings.warn(
            f"the chat template renders conversation prefixes inconsistently for {n_inexact} rows; their loss "
            "covers the assistant messages' text but not the template's end-of-turn tokens. Add "
            "{% generation %} ... {% endgeneration %} around assistant turns in the template for exact masks.",
            stacklevel=3,
        )
    return encoded


def _chat_template(tokenizer: Any) -> str:
    try:
        return tokenizer.get_chat_template()
    except ValueError:
        raise LorakitError(
            "the tokenizer has no chat template, which the messages format needs; set tokenizer.chat_template "
            "to a Jinja template, or turn the rows into prompt/completion pairs."
        ) from None


def _apply_template(tokenizer: Any, messages: list[Row], where: str, **kwargs: Any) -> Any:
    from jinja2 import TemplateError  # a dependency of transformers, needed only for chat data

    try:
        return tokenizer.apply_chat_template(messages, **kwargs)
    except TemplateError as err:
        raise LorakitError(f"{where}: the chat template refused the conversation ({err}); fix the row.") from None


def _render(tokenizer: Any, messages: list[Row], where: str, add_generation_prompt: bool = False) -> str:
    return _apply_template(tokenizer, messages, where, tokenize=False, add_generation_prompt=add_generation_prompt)


def _tagged_mask(tokenizer: Any, messages: list[Row], where: str) -> tuple[list[int], list[int]]:
    out = _apply_template(tokenizer, messages, where, return_dict=True, return_assistant_tokens_mask=True)
    return list(out["input_ids"]), list(out["assistant_masks"])


def _prefix_mask(tokenizer: Any, messages: list[Row], where: str) -> tuple[list[int], list[bool], bool]:
    text = _render(tokenizer, messages, where)
    spans = _prefix_spans(tokenizer, messages, text, where)
    exact = spans is not None
    if spans is None:
        spans = _content_spans(messages, text, where)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [any(start <= first < end for start, end in spans) for first, _ in enc["offset_mapping"]]
    return list(enc["input_ids"]), mask, exact


def _prefix_spans(tokenizer: Any, messages: list[Row], text: str, where: str) -> list[tuple[int, int]] | None:
    """Character spans of the assistant turns from prefix renderings; None where one is not a prefix."""
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], where, add_generation_prompt=True) if i else ""
        through = _render(tokenizer, messages[: i + 1], where)
        if not (text.startswith(before) and text.startswith(through) and len(before) < len(through)):
            return None
        spans.append((len(before), len(through)))
    return spans


def _content_spans(messages: list[Row], text: str, where: str) -> list[tuple[int, int]]:
    """Character spans of the assistant messages' text; every message is searched in order, so an
    assistant reply that repeats an earlier user message is not found inside the user's turn."""
    spans, position = [], 0
    for k, message in enumerate(messages):
        content = message["content"].strip()  # templates often trim
        start = text.find(content, position)
        if start < 0:
            raise LorakitError(
                f"{where}: message {k} does not appear in the chat template's output, so its loss mask cannot "
                "be found; add {% generation %} ... {% endgeneration %} around assistant turns in the template."
            )
        position = start + len(content)
        if message["role"] == "assistant":
            spans.append((start, position))
    return spans


_CAUSAL: dict[str, Callable[[Sequence[Row], Any, int], list[Encoded]]] = {
    "text": _text,
    "prompt_completion": _prompt_completion,
    "messages": _messages,
}


def _classification(
    records: Sequence[Row], tokenizer: Any, max_length: int, label_names: Sequence[Any] | None
) -> TokenizedData:
    names = label_vocabulary(records, label_names)
    index = {str(name): k for k, name in enumerate(names)}
    texts = [row["text"] for row in records]
    ids = _encode(tokenizer, texts, special=True)
    long = [i for i, row_ids in enumerate(ids) if len(row_ids) > max_length]
    if long:  # re-encoded with the tokenizer's own truncation, which keeps its special tokens
        for i, row_ids in zip(long, _encode(tokenizer, [texts[i] for i in long], True, max_length)):
            ids[i] = row_ids
    examples = [
        {"input_ids": row_ids, "label": _class_id(row["label"], index, names, i)}
        for i, (row, row_ids) in enumerate(zip(records, ids))
    ]
    return TokenizedData("text_label", examples, list(range(len(examples))), len(long), label_names=names)


def label_vocabulary(records: Sequence[Row], label_names: Sequence[Any] | None = None) -> list[Any]:
    """The classes of text_label rows in class-id order: `label_names` checked, or the labels that occur,
    sorted. Public so a caller can size a classification head before tokenizing. Labels compare by their
    text, so CSV's "1" and JSON's 1 are one class."""
    if label_names is None:
        names = sorted({row["label"] for row in records}, key=_label_key)
    else:
        names = list(label_names)
    keys = [str(name) for name in names]
    if not names or len(set(keys)) != len(keys):
        raise LorakitError(f"label names must be distinct and non-empty, got {names}; use one spelling per class.")
    return names


def _label_key(label: str | int) -> tuple[int, int, str]:
    """Integers and integer strings in numeric order, so CSV labels "2" < "10" map as the numbers do."""
    text = str(label).strip()
    return (0, int(text), "") if _INTEGER.fullmatch(text) else (1, 0, text)


def _class_id(label: str | int, index: dict[str, int], names: list[Any], row: int) -> int:
    if str(label) not in index:
        raise LorakitError(f"row {row} has label {label!r}, which is not in label_names {names}; add it there.")
    return index[str(label)]


# ---------------------------------------------------------------- batching


def collate(
    examples: Sequence[Mapping[str, Any]], pad_id: int | None, padding_side: str = "right"
) -> dict[str, torch.Tensor]:
    """Pad examples into input_ids, attention_mask and labels tensors.

    Causal-LM labels are IGNORE_INDEX on padding; classification labels are a LongTensor of class ids.
    """
    if not examples:
        raise LorakitError("collate got no examples; a batch needs at least one.")
    if pad_id is None:
        raise LorakitError("the tokenizer has no pad token; set tokenizer.pad_token = tokenizer.eos_token.")
    if padding_side not in ("right", "left"):
        raise LorakitError(f"padding_side must be 'right' or 'left', got {padding_side!r}.")
    classification = "label" in examples[0]
    if any(("label" in example) != classification for example in examples):
        raise LorakitError("collate got classification and causal-LM examples in one batch; keep them apart.")
    width = max(len(example["input_ids"]) for example in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for i, example in enumerate(examples):
        n = len(example["input_ids"])
        where = slice(0, n) if padding_side == "right" else slice(width - n, width)
        input_ids[i, where] = torch.tensor(example["input_ids"], dtype=torch.long)
        attention_mask[i, where] = 1
        if not classification:
            labels[i, where] = torch.tensor(example["labels"], dtype=torch.long)
    if classification:
        labels = torch.tensor([example["label"] for example in examples], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def batch_order(n_examples: int, batch_size: int, seed: int, epoch: int, drop_last: bool = False) -> list[list[int]]:
    """Example indices of every batch of one epoch, shuffled by (seed, epoch).

    NumPy's legacy RandomState is used because its stream is frozen (NEP 19): the same order on every
    platform and version, so a resumed run can recompute an epoch and skip the batches it has done.
    """
    _check_int("n_examples", n_examples, 0)
    _check_int("batch_size", batch_size, 1)
    _check_int("seed", seed, 0, 2**32 - 1)
    _check_int("epoch", epoch, 0, 2**32 - 1)
    order = np.random.RandomState([seed, epoch]).permutation(n_examples).tolist()
    stop = n_examples - n_examples % batch_size if drop_last else n_examples
    return [order[start : start + batch_size] for start in range(0, stop, batch_size)]


def shard(batches: Sequence[Sequence[int]], rank: int, world_size: int) -> list[list[int]]:
    """This rank's part of every global batch: the rank-th of world_size contiguous slices.

    Parts differ in size by at most one, and every rank gets at least one example per batch (a rank with
    an empty batch would stall the others in distributed training).
    """
    _check_int("world_size", world_size, 1)
    _check_int("rank", rank, 0, world_size - 1)
    parts = []
    for k, batch in enumerate(batches):
        if len(batch) < world_size:
            raise LorakitError(
                f"batch {k} has {len(batch)} examples, fewer than world_size={world_size}; use a batch size "
                "that is a multiple of world_size, or batch_order(..., drop_last=True)."
            )
        parts.append(list(batch[len(batch) * rank // world_size : len(batch) * (rank + 1) // world_size]))
    return parts


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in {low}..{high}"
        raise LorakitError(f"{name} must be an integer {bounds}, got {value!r}.")
