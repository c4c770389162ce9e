"""From sampled token ids to the text a client sees, one token at a time.

Decoding token by token is not decoding the whole: a character can span tokens (byte-level vocabularies), and
some tokenizers merge spaces across token boundaries. So each step decodes a short window of recent ids twice,
with and without the newest, and emits the difference only once it no longer ends in an incomplete character
(U+FFFD); the window then moves on, which keeps the cost per token constant.

Stop strings end a generation where they first appear and are not part of the answer. Text that could still
turn out to be the start of a stop string is held back until the next tokens decide it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"


class TextStream:
    def __init__(self, decode: Callable[[Sequence[int]], str], stops: Sequence[str] = ()) -> None:
        self._decode = decode
        self._stops = tuple(stop for stop in stops if stop)
        self._ids: list[int] = []
        self._prefix = 0  # start of the decode window
        self._read = 0  # ids before this are already in the text
        self._held = ""  # decoded, not yet emitted: might begin a stop string
        self.text = ""  # everything emitted
        self.stopped = False

    def push(self, token: int) -> str:
        """Adds one token; returns the text that is now safe to emit ("" once a stop string was seen)."""
        if self.stopped:
            return ""
        self._ids.append(token)
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if len(after) <= len(before) or after.endswith(REPLACEMENT):
            return ""  # an incomplete character: wait for the bytes that finish it
        self._held += after[len(before) :]
        self._prefix, self._read = self._read, len(self._ids)
        return self._release()

    def flush(self) -> str:
        """At the end of the generation: whatever was held back, an unfinished character's bytes included, as
        U+FFFD (what the tokenizer's own decode gives for them)."""
        if self.stopped:
            return ""
        released = ""
        if self._read < len(self._ids):
            before = self._decode(self._ids[self._prefix : self._read])
            after = self._decode(self._ids[self._prefix :])
            self._held += after[len(before) :]
            self._prefix = self._read = len(self._ids)
            released = self._release()  # the last bytes may still complete a stop string
            if self.stopped:
                return released
        tail, self._held = self._held, ""
        self.text += tail
        return released + tail

    def _release(self) -> str:
        # A stop string may begin in text emitted earlier only if it also ends in the held part; the held part
        # always starts after the last place a stop string could have begun, so searching it alone suffices.
        candidates = [(self._held.find(stop), stop) for stop in self._stops]
        found = [(index, stop) for index, stop in candidates if index >= 0]
        if found:
            index = min(found)[0]
            out = self._held[:index]
            self._held = ""
            self.stopped = True
            self.text += out
            return out
        keep = self._partial_stop_suffix(self._held)
        out = self._held[: len(self._held) - keep]
        self._held = self._held[len(self._held) - keep :]
        self.text += out
        return out

    def _partial_stop_suffix(self, text: str) -> int:
        """Length of the longest end of ``text`` that is the beginning of some stop string."""
        longest = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:size]):
                    longest = size
                    break
        return longest
