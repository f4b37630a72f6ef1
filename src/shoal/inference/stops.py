"""Stop strings over streamed text: hold back what might be the start of a stop string."""

from dataclasses import dataclass, field


@dataclass
class StopMatcher:
    """Feed text as it comes; get back what is safe to emit and whether a stop string was hit."""

    stops: tuple[str, ...]
    _held: str = field(default="", init=False)

    def push(self, text: str) -> tuple[str, bool]:
        """Returns (text to emit now, stopped). After a stop, the rest is dropped."""
        if not self.stops:
            return text, False
        buf = self._held + text
        hits = [i for i in (buf.find(s) for s in self.stops if s) if i >= 0]
        if hits:
            self._held = ""
            return buf[: min(hits)], True
        keep = self._longest_partial(buf)
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        """Release what was held back (the stream ended without a stop)."""
        held, self._held = self._held, ""
        return held

    def _longest_partial(self, buf: str) -> int:
        """Length of the longest suffix of buf that is a proper prefix of some stop string."""
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(buf)), best, -1):
                if buf.endswith(stop[:n]):
                    best = n
                    break
        return best
