"""Stop strings over a streamed text, where a stop string may span several tokens.

Ollama (runner `findStop` / `containsStopSuffix` / `truncateStop`) holds back generated text while its tail could
still become a stop string, and when a stop string completes it returns the text before it, never the stop
string itself, with done_reason "stop". `StopMatcher` does the same over the detokenised pieces.
"""

from __future__ import annotations

from typing import Iterable


class StopMatcher:
    """Feed text pieces with `push`; emit what it returns; call `flush` when generation ends without a stop."""

    def __init__(self, stops: Iterable[str]) -> None:
        self.stops = tuple(s for s in stops if s)  # an empty stop string would match everywhere; Ollama skips it
        self._held = ""
        self.stopped = False
        self.matched: str | None = None

    def push(self, text: str) -> tuple[str, bool]:
        """Add a piece of text. Returns (text safe to emit now, whether a stop string completed).

        After a stop, the emitted text ends right before the earliest stop string and later pushes return ("", True).
        """
        if self.stopped:
            return "", True
        if not self.stops:
            return text, False
        buf = self._held + text
        # The earliest occurrence of any stop string wins; what precedes it is emitted.
        cut = -1
        for s in self.stops:
            i = buf.find(s)
            if i != -1 and (cut == -1 or i < cut):
                cut, self.matched = i, s
        if cut != -1:
            self.stopped = True
            self._held = ""
            return buf[:cut], True
        hold = self._partial_suffix(buf)
        self._held = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        """Text held back as a possible stop prefix, released when the generation ends for another reason."""
        out, self._held = ("" if self.stopped else self._held), ""
        return out

    def _partial_suffix(self, buf: str) -> int:
        """Length of the longest tail of buf that is a proper prefix of some stop string."""
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), best, -1):
                if buf.endswith(s[:k]):
                    best = k
                    break
        return best
