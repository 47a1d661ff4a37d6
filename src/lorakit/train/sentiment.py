"""The embedded default task: binary sentiment of human-rated movie-review sentences.

Data: C.J. Hutto and E.E. Gilbert (2014). VADER: A Parsimonious Rule-based Model for Sentiment Analysis of
Social Media Text. Eighth International Conference on Weblogs and Social Media (ICWSM-14), Ann Arbor, MI.
Its file movieReviewSnippets_GroundTruth.txt holds 10,605 sentences from rotten.tomatoes.com reviews (from
the review set of Pang & Lee, 2004), each with the mean of at least 20 human ratings on -4..4; lorakit
fetches it from the vaderSentiment 3.3.2 sdist (`python -m lorakit.assets fetch`).

A sentence is positive when its mean rating is > 0.5 and negative when < -0.5; the 562 near-neutral ones
are dropped, leaving 10,043 (4,982 positive, 5,061 negative). The split ranks sentences by the sha256 of
seed and text, so it is the same on every platform and library version, and a sentence that occurs twice
never lands on both sides.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from lorakit.errors import FormatError, LorakitError

PROMPT = "Review: {text}\nSentiment:"
ANSWERS = (" negative", " positive")  # indexed by label: 0 = negative, 1 = positive
THRESHOLD = 0.5
N_TEST = 1200


@dataclass(frozen=True)
class Example:
    """One labelled sentence; `answer` is the completion the model should produce after `prompt`."""

    id: int
    text: str
    rating: float
    label: int

    @property
    def answer(self) -> str:
        return ANSWERS[self.label]

    @property
    def prompt(self) -> str:
        return format_prompt(self.text)


def format_prompt(text: str) -> str:
    """The instruction prompt of the demo; the model answers " positive" or " negative"."""
    return PROMPT.format(text=text)


def read_rows(path: Path | None = None) -> list[tuple[int, float, str]]:
    """All 10,605 (id, mean rating, text) rows; runs of whitespace in the text collapse to one space."""
    if path is None:
        from lorakit.assets import default_data_path

        path = default_data_path()
    # The file is UTF-8 with CRLF line ends (its sha256 is pinned); strict decoding surfaces any other bytes.
    try:
        with open(path, encoding="utf-8", newline=None) as f:
            lines = f.read().split("\n")
    except UnicodeDecodeError as err:
        raise FormatError(f"{path} is not UTF-8 text ({err}).") from None
    rows = []
    for number, line in enumerate(lines, 1):
        if not line:
            continue
        try:
            id_, rating, text = line.split("\t", 2)
            rows.append((int(id_), float(rating), " ".join(text.split())))
        except ValueError:
            expected = "id<TAB>mean rating<TAB>text"
            raise FormatError(f"{path} line {number}: expected {expected}, got {line[:60]!r}.") from None
    return rows


def load_examples(path: Path | None = None, threshold: float = THRESHOLD) -> list[Example]:
    """Sentences rated clearly positive (> threshold) or negative (< -threshold), in file order."""
    return [
        Example(id_, text, rating, int(rating > 0))
        for id_, rating, text in read_rows(path)
        if abs(rating) > threshold
    ]


def split(examples: list[Example], n_test: int = N_TEST, seed: int = 0) -> tuple[list[Example], list[Example]]:
    """(train, test): test holds the sentences of the n_test lowest hash keys.

    Both come in hash order, a fixed shuffle: the file lists positive sentences first, so any prefix of
    a list in file order would be nearly all one class.
    """
    keyed = sorted(((_key(e.text, seed), e) for e in examples), key=lambda ke: (ke[0], ke[1].id))
    distinct = list(dict.fromkeys(k for k, _ in keyed))
    if not 0 < n_test < len(distinct):
        raise LorakitError(f"n_test must be between 1 and {len(distinct) - 1} (distinct sentences), got {n_test}.")
    test_keys = set(distinct[:n_test])
    return [e for k, e in keyed if k not in test_keys], [e for k, e in keyed if k in test_keys]


def load_splits(path: Path | None = None, n_test: int = N_TEST, seed: int = 0) -> tuple[list[Example], list[Example]]:
    """The default task's (train, test) lists."""
    return split(load_examples(path), n_test=n_test, seed=seed)


def _key(text: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}\n{text}".encode()).hexdigest()
