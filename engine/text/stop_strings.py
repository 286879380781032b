"""Stop strings over streamed text: emit what is safe, hold back what may still begin a stop, cut at the stop."""
from __future__ import annotations


class StopStringMatcher:
    """Feed decoded text deltas; get back the text that can be emitted now and whether a stop string matched.

    A stop may span several deltas. The emitted text never contains the stop string. At most
    ``max(len(stop)) - 1`` trailing characters are held back, and only while they could still begin a stop.
    """

    def __init__(self, stops: list[str]) -> None:
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        self.stops = list(stops)
        self._max_hold = max((len(s) for s in self.stops), default=1) - 1
        self._held = ""          # text not emitted yet: the longest suffix that is a proper prefix of a stop
        self.stopped = False
        self.matched: str | None = None   # the stop string that ended the text (a request's stop_reason)

    def feed(self, delta: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        if not self.stops:
            return delta, False
        # A stop that began in text already emitted would have kept that text held, so searching the held tail
        # plus the delta finds every match.
        text = self._held + delta
        hits = [(i, s) for s in self.stops if (i := text.find(s)) >= 0]
        if hits:
            first, self.matched = min(hits, key=lambda hit: hit[0])   # the earliest match wins
            self.stopped = True
            self._held = ""
            return text[:first], True
        hold = self._hold_length(text)
        self._held = text[len(text) - hold:]
        return text[:len(text) - hold], False

    def flush(self) -> str:
        """The held-back tail, at the end of generation (empty after a stop)."""
        tail, self._held = self._held, ""
        return tail

    def _hold_length(self, text: str) -> int:
        for n in range(min(self._max_hold, len(text)), 0, -1):
            suffix = text[-n:]
            if any(s.startswith(suffix) for s in self.stops):
                return n
        return 0
