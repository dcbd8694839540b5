"""The Video tab's readouts: reasoning steps with their stream times, text without the model's
control tokens, and the frame the model is seeing right now.

Why here: the TaYS engine reports tokens (`tays.TokenRecord`) with the stream time of the newest
frame group they could see; turning those into a list a person reads, and tapping the source for
the live frame, is presentation, not engine logic.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
from PIL import Image

from tays import TokenRecord
from tays.sources import FrameSource
from vstream.model import THINK_CLOSE, THINK_OPEN

_SPECIAL = re.compile(r"<\|[^|<>]{1,40}\|>")
STEP_HEADERS = ["step", "stream time (s)", "said at (s)", "text"]


def clean(text: str) -> str:
    """Text as a reader should see it: no `<|eot|>`-style control tokens, no think tags."""
    out = _SPECIAL.sub(" ", str(text)).replace(THINK_OPEN, "").replace(THINK_CLOSE, "\n")
    return re.sub(r"[ \t]{2,}", " ", out).strip()


class StepLog:
    """Tokens in, steps out: a step closes at a sentence end or an end-of-step token, and is
    stamped with the stream time of the newest frame the model had seen when it began, and the
    wall time (since stream start) of its last token."""

    def __init__(self) -> None:
        self.steps: list[list[Any]] = []  # rows under STEP_HEADERS
        self.answer = ""
        self._text = ""
        self._stream_t: float | None = None
        self._wall = 0.0

    def add(self, rec: TokenRecord) -> None:
        if rec.phase == "answer":
            self._close()
            self.answer += rec.text
            return
        if self._stream_t is None and rec.stream_time > float("-inf"):
            self._stream_t = float(rec.stream_time)
        self._text += rec.text
        self._wall = float(rec.wall)
        if _SPECIAL.search(rec.text) or self._text.rstrip().endswith((".", "!", "?")):
            self._close()

    def _close(self) -> None:
        text = clean(self._text)
        if text:
            st = "–" if self._stream_t is None else round(self._stream_t, 2)
            self.steps.append([len(self.steps) + 1, st, round(self._wall, 2), text])
        self._text, self._stream_t = "", None

    def rows(self) -> list[list[Any]]:
        """Closed steps plus the one being written (marked with an ellipsis)."""
        tail = clean(self._text)
        if not tail:
            return list(self.steps)
        st = "–" if self._stream_t is None else round(self._stream_t, 2)
        return [*self.steps, [len(self.steps) + 1, st, round(self._wall, 2), tail + " …"]]

    def text(self) -> str:
        """The whole reasoning so far, cleaned, with the answer on its own line."""
        body = " ".join(r[3] for r in self.rows())
        return body + (f"\n\nAnswer: {clean(self.answer)}" if clean(self.answer) else "")


class TappedSource(FrameSource):
    """A frame source that remembers the last frame it handed to the engine (the Video tab shows
    it live); everything else is the wrapped source's."""

    def __init__(self, inner: FrameSource) -> None:
        self.inner = inner
        self.fps, self.realtime, self.speed = inner.fps, inner.realtime, inner.speed
        self.duration, self.events, self.name = inner.duration, inner.events, inner.name
        self.question = getattr(inner, "question", None)
        self._lock = threading.Lock()
        self._last: tuple[float, Any] | None = None

    def iter_frames(self, stop: threading.Event | None = None, t0: float | None = None) -> Iterator[tuple[float, Any]]:
        for t, frame in self.inner.iter_frames(stop=stop, t0=t0):
            with self._lock:
                self._last = (float(t), frame)
            yield t, frame

    def last_frame(self, max_side: int = 320) -> tuple[float, Image.Image] | None:
        """(stream time, a small RGB copy) of the newest frame, or None before the first."""
        with self._lock:
            last = self._last
        if last is None:
            return None
        t, frame = last
        try:
            img = frame if isinstance(frame, Image.Image) else Image.fromarray(np.asarray(frame).astype(np.uint8))
            img = img.convert("RGB")
            img.thumbnail((max_side, max_side))
        except (TypeError, ValueError, OSError):
            return None
        return t, img

    def close(self) -> None:
        self.inner.close()
