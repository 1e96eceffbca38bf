"""Stop-string handling shared by every engine: finds the first stop string and holds back partial matches.

Streaming must not show a client text that a stop string later cuts off, so text that could be the start of a
stop string is held back until the next token settles it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StopStringMatcher:
    """Accumulates one request's decoded text and decides how much of it may be released."""

    stop: tuple[str, ...]
    text: str = ""  # all text decoded so far
    released: int = 0  # how many characters of `text` were already handed out
    stopped: bool = False

    def feed(self, new_text: str) -> str:
        """Add newly decoded text; return the part that is now safe to emit. Sets `stopped` on a match."""
        if self.stopped:
            return ""
        search_from = max(0, len(self.text) - max((len(s) for s in self.stop), default=0))
        self.text += new_text
        cut = self._first_stop(search_from)
        if cut is not None:
            self.stopped = True
            self.text = self.text[:cut]
            return self._release(cut)
        return self._release(len(self.text) - self._partial_suffix())

    def flush(self) -> str:
        """Release everything held back (the request ended for another reason)."""
        return self._release(len(self.text))

    def _first_stop(self, start: int) -> int | None:
        hits = [i for s in self.stop if s and (i := self.text.find(s, start)) >= 0]
        return min(hits) if hits else None

    def _partial_suffix(self) -> int:
        """Length of the longest tail of `text` that is a proper prefix of some stop string."""
        longest = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), longest, -1):
                if self.text.endswith(s[:n]):
                    longest = n
                    break
        return longest

    def _release(self, upto: int) -> str:
        upto = max(upto, self.released)
        out = self.text[self.released : upto]
        self.released = upto
        return out
