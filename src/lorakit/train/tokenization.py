"""Tokenizing training rows with their loss masks: BOS/EOS, prompt and completion joined at an exact
boundary, chat templates with assistant-only loss, classification labels, and truncation (see data.py).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from lorakit.errors import LorakitError

from .batching import IGNORE_INDEX, check_int
from .formats import check_rows, infer_task
from .records import Row, describe_row

TRUNCATION = {
    "text": "cut on the right",
    "prompt_completion": "prompt cut on the left so the completion survives",
    "messages": "cut on the right",
    "text_label": "cut on the right",
}
_GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")
_INTEGER = re.compile(r"[+-]?\d+")

Encoded = tuple[list[int], list[int], bool]  # input_ids, labels, truncated


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
    check_int("max_length", max_length, 2)
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
        where = describe_row(records, i)
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
        {"input_ids": row_ids, "label": _class_id(row["label"], index, names, describe_row(records, i))}
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


def _class_id(label: str | int, index: dict[str, int], names: list[Any], where: str) -> int:
    if str(label) not in index:
        raise LorakitError(f"{where} has label {label!r}, which is not in label_names {names}; add it there.")
    return index[str(label)]


