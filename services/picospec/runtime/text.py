"""Text around token ids: prompts, stop strings, incremental detokenisation."""

from __future__ import annotations

from collections.abc import Callable, Sequence


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """Cut ``text`` before the earliest stop string; report whether one matched."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    if not hits:
        return text, False
    return text[: min(hits)], True


class TextStream:
    """Incremental detokenisation for streaming: emits only text that is final.

    Text that could still turn into a stop string, or that ends in an incomplete UTF-8
    sequence, is held back until the next tokens decide it.
    """

    def __init__(self, decode: Callable[[list[int]], str], stops: Sequence[str] = ()) -> None:
        self._decode = decode
        self._stops = [s for s in stops if s]
        self.ids: list[int] = []
        self.sent = ""
        self.stopped = False

    def push(self, ids: list[int]) -> str:
        if self.stopped:
            return ""
        self.ids.extend(ids)
        text = self._decode(self.ids)
        cut, hit = cut_at_stop(text, self._stops)
        if hit:
            self.stopped = True
            return self._emit(cut)
        safe = len(text.rstrip("\ufffd"))
        for s in self._stops:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    safe = min(safe, len(text) - k)
                    break
        return self._emit(text[:safe])

    def finish(self) -> str:
        """Everything not yet emitted (stop strings already cut)."""
        if self.stopped:
            return ""
        return self._emit(cut_at_stop(self._decode(self.ids), self._stops)[0])

    def _emit(self, upto: str) -> str:
        if not upto.startswith(self.sent) or len(upto) <= len(self.sent):
            return ""  # decoding revised earlier text (rare); never un-send
        new = upto[len(self.sent) :]
        self.sent = upto
        return new
