"""Cut a streamed reasoning trace into thinking spans (sentences) as tokens arrive.

A span closes the moment its end is visible, so its attribution can be computed while the
model keeps writing. A '.' right after a digit might be a decimal point ("3.5"), so that one
waits for the next character; every other terminator closes at once. `</think>` closes the
open thought, and whatever follows is the answer span; `finish()` closes a span that never
saw an end (a trace with no sentence end still yields one span).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vstream.model import THINK_CLOSE, THINK_OPEN

TERMINATORS = ".!?"


@dataclass
class Span:
    index: int
    kind: str  # "thought" or "answer"
    text: str
    token_start: int  # index of the first generated token in the span
    token_end: int  # one past the last token
    closed_by: str = ""  # the terminator, "</think>", or "end"

    @property
    def n_tokens(self) -> int:
        return self.token_end - self.token_start


@dataclass
class SpanSplitter:
    """Feed `(token_index, text_piece)` pairs; get back the spans each piece closes."""

    spans: list[Span] = field(default_factory=list)
    _text: str = ""
    _start: int | None = None
    _last: int = -1
    _kind: str = "thought"
    _pending_dot: bool = False  # a '.' after a digit: decide on the next character
    _dot_end: int = 0

    def push(self, token_index: int, piece: str) -> list[Span]:
        closed: list[Span] = []
        self._last = token_index
        for tag in (THINK_OPEN, THINK_CLOSE):
            if tag in piece:
                before, _, after = piece.partition(tag)
                closed += self._feed(token_index, before)
                end = token_index + 1 if before.strip() else token_index
                closed += self._close(end, tag)
                self._kind = "answer" if tag == THINK_CLOSE else "thought"
                closed += self._feed(token_index + 1, after)
                return closed
        return self._feed(token_index, piece)

    def finish(self) -> list[Span]:
        """Close whatever is open (generation ended or was stopped)."""
        return self._close(self._last + 1, "end")

    def _feed(self, token_index: int, piece: str) -> list[Span]:
        closed: list[Span] = []
        for ch in piece:
            if self._pending_dot:
                self._pending_dot = False
                if not ch.isdigit():
                    closed += self._close(self._dot_end, ".")
            if self._start is None:
                if ch.isspace():
                    continue
                self._start = token_index
            self._text += ch
            if ch in TERMINATORS:
                prev = self._text[-2:-1]
                if ch == "." and prev.isdigit():
                    self._pending_dot, self._dot_end = True, token_index + 1
                else:
                    closed += self._close(token_index + 1, ch)
        return closed

    def _close(self, token_end: int, why: str) -> list[Span]:
        self._pending_dot = False
        text = self._text.strip()
        if self._start is None or not text:
            self._text, self._start = "", None
            return []
        span = Span(len(self.spans), self._kind, text, self._start, max(token_end, self._start + 1), why)
        self.spans.append(span)
        self._text, self._start = "", None
        return [span]


class FixedSpans:
    """A span every `n` tokens (push/finish, like `SpanSplitter`): for scaling benchmarks, and for
    random-weight models, which rarely end a sentence."""

    def __init__(self, n: int = 32):
        self.n, self.spans, self._start, self._last = int(n), [], None, -1

    def push(self, i: int, piece: str) -> list[Span]:
        self._last = i
        self._start = i if self._start is None else self._start
        return self._close(i + 1) if i + 1 - self._start >= self.n else []

    def finish(self) -> list[Span]:
        return self._close(self._last + 1) if self._start is not None else []

    def _close(self, end: int) -> list[Span]:
        span = Span(len(self.spans), "thought", f"span {len(self.spans)}", self._start, end, "fixed")
        self.spans.append(span)
        self._start = None
        return [span]


def span_end_tokens(tokenizer: Any) -> frozenset[int] | None:
    """Ids of the tokens that can end a `SpanSplitter` span: those whose vocabulary entry holds a
    terminator or a think tag, and byte-fallback tokens (``<0x..>``). None when the tokenizer
    has no vocabulary to look at (then every token counts)."""
    try:
        vocab = tokenizer.get_vocab()
    except (AttributeError, NotImplementedError, TypeError):
        return None
    marks = (*TERMINATORS, THINK_OPEN, THINK_CLOSE)
    return frozenset(int(i) for piece, i in vocab.items() if any(m in piece for m in marks) or piece.startswith("<0x"))
