"""Tokens to text as they come: what of an answer is safe to show, and where it ends."""
from __future__ import annotations


class TextStream:
    """Tokens to text for one row: waits for the last byte of a split character, holds back text that could be the
    start of a stop string, and ends at a stop token or before a stop string."""

    def __init__(self, tokenizer, stop: tuple[str, ...], stop_ids=None):
        self.tokenizer, self.stop = tokenizer, tuple(s for s in stop if s)
        self.stop_ids = tokenizer.stop_ids if stop_ids is None else stop_ids
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text already given out
        self.text = ""  # the text of ids[:read]
        self.read = 0  # tokens whose text is known: they ended on a whole character
        self.before = 0  # where the last token's text is decoded from (the tokens before ``read`` give context)
        self.done = False
        self.at_stop_token = False  # the answer ended with a stop token, which is not part of it

    def feed(self, token: int) -> str:
        """The new text this token makes safe to show (maybe none); sets ``done`` when the answer ends."""
        if token in self.stop_ids:
            self.done = self.at_stop_token = True
            return self._end()
        self.ids.append(token)
        text = self._decoded()
        if text is None:  # a character split across tokens: wait for its last byte
            return ""
        return self._show(text)

    def _show(self, text: str) -> str:
        """``text``, the whole answer's, becomes what is known: the part safe to show goes out."""
        self.text = text
        cuts = [i for i in (text.find(s, max(0, self.sent - len(s) + 1)) for s in self.stop) if i >= 0]
        if cuts:
            self.done = True
            self.text = text[: min(cuts)]
            return self._release(len(self.text))
        hold = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return self._release(len(text) - hold)

    def _decoded(self) -> str | None:
        """The text of every token so far, or None if it ends inside a character. Only the new tokens are decoded,
        after those read last time: the window's text minus the text of its start alone, which begins with the same
        token (a SentencePiece decoder drops the space that starts a text: from both). Decoding the whole answer at
        each token grew with its length: with SmolLM2's tokenizer, 0.38 ms a token between the 2,000th and the
        4,000th, for each row of a step; now 5 us at any length. A tokenizer whose window's text does not begin with
        its start's is decoded whole."""
        window = self.tokenizer.decode(self.ids[self.before:])
        if window.endswith("\ufffd"):
            return None
        start = self.tokenizer.decode(self.ids[self.before:self.read])
        text = self.text + window[len(start):] if window.startswith(start) else self.tokenizer.decode(self.ids)
        self.before, self.read = self.read, len(self.ids)
        return text

    def finish(self) -> str:
        """What was held back, when the answer ends by length."""
        return self._end()

    def _end(self) -> str:
        """The rest of the answer: a character its last tokens left split is shown as it decodes (U+FFFD), not lost."""
        piece = self._show(self.tokenizer.decode(self.ids)) if self.read < len(self.ids) else ""
        return piece + self._release(len(self.text))

    def _release(self, upto: int) -> str:
        piece = self.text[self.sent : upto] if upto > self.sent else ""
        self.sent = max(self.sent, upto)
        return piece
