"""Turning a request's generated tokens into text as they come: stop strings, and never a partial character
or a piece of a possible stop string sent before it is certain."""

from __future__ import annotations

from typing import Any


class TextTracker:
    """Decodes the whole output again at each token (exact for any tokenizer) and releases only settled text."""

    def __init__(self, tokenizer: Any, stop: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.sent = 0  # characters already released
        self.text = ""

    def add(self, token: int) -> tuple[str, bool]:
        """Append a token; returns (newly settled text, whether a stop string ended the output)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        hit = self._first_stop(text)
        if hit is not None:
            self.text = text[:hit]
            return self._release(len(self.text)), True
        self.text = text
        settled = len(text) - self._held_back(text)
        if text.endswith("\ufffd"):  # a multi-byte character still incomplete
            settled = min(settled, len(text) - 1)
        return self._release(settled), False

    def finish(self) -> str:
        """Whatever was held back, once the output has ended for another reason."""
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        piece = self.text[self.sent:upto] if upto > self.sent else ""
        self.sent = max(self.sent, upto)
        return piece

    def _first_stop(self, text: str) -> int | None:
        start = max(0, self.sent - max((len(s) for s in self.stop), default=0))
        found = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
        return min(found) if found else None

    def _held_back(self, text: str) -> int:
        """Length of the longest tail of `text` that could still grow into a stop string."""
        longest = 0
        for stop in self.stop:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest
