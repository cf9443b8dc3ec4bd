"""Stop sequences matched on generated text, across token boundaries.

The stop that starts earliest in the text wins, the longest one among those starting at the same
place — however the text happens to be split into tokens. So text is held back while it might
still be (the start of) a stop sequence, and a complete match is settled only once no stop that
starts earlier, or at the same place but longer, could still complete. A client never sees any
part of a stop sequence.
"""

from __future__ import annotations

from localvl.errors import InvalidRequestError

# Text held back is matched against every stop at every step, so a request's stops bound the work
# it adds to each step of the whole batch (2,000 stops of 3,000 characters: ~1.7 s a step on this
# project's CPU; 64 of 256: ~3 ms at worst). Far beyond what clients send (OpenAI's API takes 4).
MAX_STOPS = 64
MAX_STOP_CHARS = 256


def check_stops(stop_sequences: tuple[str, ...] | list[str]) -> None:
    """Refuse stops past the bounds above with a 400 that names them."""
    if len(stop_sequences) > MAX_STOPS:
        raise InvalidRequestError(f"stop sequences: at most {MAX_STOPS} are accepted; got {len(stop_sequences)}")
    longest = max(map(len, stop_sequences), default=0)
    if longest > MAX_STOP_CHARS:
        raise InvalidRequestError(f"stop sequences: each may be at most {MAX_STOP_CHARS} characters; one has {longest}")


class StopMatcher:
    def __init__(self, stop_sequences: tuple[str, ...] | list[str]) -> None:
        self._stops = tuple(dict.fromkeys(s for s in stop_sequences if s))
        self._held = ""
        self.matched: str | None = None
        # Characters taken in and let out so far: where a token's text starts in the stream tells
        # whether any of it was shown (its log-probability belongs to the answer) or all of it
        # fell inside a stop (it does not).
        self.fed = 0
        self.shown = 0

    def feed(self, text: str) -> str:
        """Add generated text; return what can be shown now. Sets ``matched`` once a match is settled."""
        if self.matched is not None:
            return ""
        self.fed += len(text)
        shown = self._feed(text)
        self.shown += len(shown)
        return shown

    def _feed(self, text: str) -> str:
        if not self._stops:
            return text
        buffer = self._held + text
        match = self._first_match(buffer)
        pending = self._first_partial(buffer, match)
        if match is not None and pending is None:
            self.matched = match[1]
            self._held = ""
            return buffer[: match[0]]
        keep_from = len(buffer) if pending is None else pending
        if match is not None:
            keep_from = min(keep_from, match[0])
        self._held = buffer[keep_from:]
        return buffer[:keep_from]

    def flush(self) -> str:
        """At the end of generation: settle a match still waiting on longer candidates, or release the text."""
        if self.matched is not None:
            return ""
        held, self._held = self._held, ""
        match = self._first_match(held)
        if match is not None:
            self.matched = match[1]
            held = held[: match[0]]
        self.shown += len(held)
        return held

    def _first_match(self, buffer: str) -> tuple[int, str] | None:
        best: tuple[int, str] | None = None
        for stop in self._stops:
            at = buffer.find(stop)
            if at >= 0 and (best is None or at < best[0] or (at == best[0] and len(stop) > len(best[1]))):
                best = (at, stop)
        return best

    def _first_partial(self, buffer: str, match: tuple[int, str] | None) -> int | None:
        """The earliest position where the buffer's tail is an unfinished stop that could beat ``match``."""
        limit = len(buffer) if match is None else match[0]
        for start in range(max(0, len(buffer) - max(map(len, self._stops)) + 1), min(limit, len(buffer) - 1) + 1):
            tail = buffer[start:]
            for stop in self._stops:
                if len(stop) > len(tail) and stop.startswith(tail):
                    if match is None or start < match[0] or len(stop) > len(match[1]):
                        return start
        return None
