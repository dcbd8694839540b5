"""The Video tab's readouts: reasoning steps with their stream times, text without the model's
control tokens, the frame the model is seeing right now, and attribution while watching (each
step's heatmap on the frame group it relied on most, the timeline).

Why here: the TaYS engine reports tokens (`tays.TokenRecord`) with the stream time of the newest
frame group they could see; turning those into a list a person reads, and tapping the source for
the live frame, is presentation, not engine logic.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import re
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go
from PIL import Image

from tays import TokenRecord
from tays.sources import FrameSource
from tays.watch import GroupSeen, StepScores, WatchDone
from ui import figures
from vstream.model import THINK_CLOSE, THINK_OPEN
from vstream.world.assets import WATCHING_ESTIMATORS

KEEP_FRAMES = 512  # frame groups whose frame the tab keeps for heatmaps (about 4 min at 2 FPS)

_SPECIAL = re.compile(r"<\|[^|<>]{1,40}\|>")
STEP_HEADERS = ["step", "stream time (s)", "said at (s)", "relied on frame (s)", "best region", "text"]


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


# ----------------------------------------------------------------------------------------------
# attribution while watching: heatmaps and the timeline


def video_estimator(vlm: Any) -> tuple[Any, str]:
    """The estimator the Video tab scores steps with, and a line saying which: the video-trained
    one (`python -m tays train-attribution`) when it is there and fits the model, else the
    still-image estimator applied per frame group, else raw attention."""
    from vstream.attr.estimator import load
    from vstream.model import VLMError

    for path, what in zip(WATCHING_ESTIMATORS, ("video-trained estimator", "still-image estimator")):
        if Path(path).is_file():
            try:
                return load(path, vlm, allow_model_mismatch=True), f"attribution: {what} ({Path(path).name})"
            except VLMError:
                continue
    return None, "attribution: raw attention (no estimator fits this model)"


def _first_seen(groups: dict[int, GroupSeen], g: int | None) -> GroupSeen | None:
    return None if g is None else groups.get(g)


class WatchLog:
    """Attribution events in (`tays.watch`), what the Video tab draws out: the heatmap of a step
    on the frame group it relied on most, and the timeline. Fed from the app's polling loop."""

    def __init__(self, events: Sequence[Any] | None = None, speed: float = 1.0) -> None:
        self.groups: dict[int, GroupSeen] = {}
        self.steps: list[StepScores] = []
        self.truth = list(events or [])  # ground-truth events (tays.sources.EventTruth) when known
        self.speed = float(speed)
        self.error: str | None = None

    def add(self, ev: Any) -> None:
        if isinstance(ev, GroupSeen):
            self.groups[ev.index] = ev
            old = ev.index - KEEP_FRAMES  # a long webcam session keeps the newest frames only
            if old in self.groups and self.groups[old].frame is not None:
                self.groups[old] = dataclasses.replace(self.groups[old], frame=None)
        elif isinstance(ev, StepScores):
            self.steps.append(ev)
        elif isinstance(ev, WatchDone) and ev.error:
            self.error = ev.error

    def heatmap(self, step: int | None = None, group: int | None = None) -> Image.Image | None:
        """A step's region scores over one frame group it saw (default: its top group), drawn on
        that group's frame. step None: the latest scored step that saw a frame."""
        cands = [s for s in self.steps if s.groups]
        if not cands:
            return None
        s = cands[-1] if step is None else next((x for x in cands if x.step == step), None)
        if s is None:
            return None
        g = s.top_group if group is None else group
        seen = _first_seen(self.groups, g)
        scores = s.scores_of(g) if g is not None else None
        if seen is None or seen.frame is None or scores is None:
            return None
        frame = seen.frame if isinstance(seen.frame, Image.Image) else Image.fromarray(np.asarray(seen.frame))
        frame = frame.convert("RGB")
        r = seen.regions
        heat = r.scores_to_heatmap(scores, frame.size)
        return figures.overlay(frame, heat, outlines=r.outlines(frame.size))

    def live_heatmap(self) -> Image.Image | None:
        """The latest scored step on the newest frame group it could see (the frame being seen)."""
        cands = [s for s in self.steps if s.groups]
        return None if not cands else self.heatmap(cands[-1].step, cands[-1].groups[-1])

    def relied_on(self, s: StepScores) -> tuple[Any, Any]:
        """(stream time of the frame group the step relied on most, best region there); dashes
        for a step that saw no frame."""
        top = s.top_group
        if top is None:
            return "–", "–"
        return round(s.group_times[s.groups.index(top)], 2), s.top_region

    def timeline(self) -> go.Figure:
        """x = stream time: frame groups ingested, each step where it was written with a line to
        the frame group it relied on most, ground-truth events when the source knows them."""
        fig = go.Figure()
        gs = sorted(self.groups.values(), key=lambda g: g.index)
        fig.add_trace(
            go.Scatter(
                x=[g.time for g in gs],
                y=["frames"] * len(gs),
                mode="markers",
                marker={"symbol": "square", "size": 9, "color": "#4c78a8"},
                name="frame groups",
                text=[f"group {g.index}" for g in gs],
                hoverinfo="text+x",
            )
        )
        xs, ys, texts, lx, ly = [], [], [], [], []
        for s in self.steps:
            t = s.end * self.speed
            xs.append(t)
            ys.append("steps")
            texts.append(f"{s.step + 1}: {clean(s.text) or '(nothing new)'}")
            if s.top_group is not None:
                lx += [t, s.group_times[s.groups.index(s.top_group)], None]
                ly += ["steps", "frames", None]
        fig.add_trace(go.Scatter(x=lx, y=ly, mode="lines", line={"color": "#bbbbbb", "width": 1}, name="relied on"))
        fig.add_trace(
            go.Scatter(
                x=xs,
                y=ys,
                mode="markers",
                marker={"size": 10, "color": "#e45756"},
                name="reasoning steps",
                text=texts,
                hoverinfo="text+x",
                customdata=[s.step for s in self.steps],
            )
        )
        if self.truth:
            fig.add_trace(
                go.Scatter(
                    x=[e.time for e in self.truth],
                    y=["events"] * len(self.truth),
                    mode="markers",
                    marker={"symbol": "diamond", "size": 10, "color": "#54a24b"},
                    name="events (ground truth)",
                    text=[e.text for e in self.truth],
                    hoverinfo="text+x",
                )
            )
        fig.update_layout(
            height=230,
            margin={"l": 60, "r": 10, "t": 10, "b": 35},
            xaxis_title="stream time (s)",
            yaxis={"categoryorder": "array", "categoryarray": ["events", "frames", "steps"]},
            legend={"orientation": "h", "y": -0.35},
        )
        return fig


def _key(text: str) -> str:
    """Text without control tokens or any whitespace: the keys of consecutive engine steps concatenate
    to the key of their joined text, wherever the tokens split words."""
    return "".join(clean(text).split())


def align_steps(texts: Sequence[str], steps: Sequence[StepScores]) -> list[StepScores | None]:
    """The scored engine step each displayed step text ends in, in order (None: not scored yet).
    The table splits at sentence ends and control tokens, the engine also at its step cap, so a
    row may share an engine step with others or run over several: each row is found in the
    engine steps' joined text after the previous row's match."""
    keys = [_key(s.text) for s in steps]
    ends = list(itertools.accumulate(len(k) for k in keys))  # char end of each step in `joined`
    joined, pos = "".join(keys), 0
    out: list[StepScores | None] = []
    for text in texts:
        want = _key(text)
        at = joined.find(want, pos) if want else -1
        if at < 0:
            out.append(None)
            continue
        pos = at + len(want)
        out.append(steps[bisect.bisect_left(ends, pos)])
    return out


def step_table(log: StepLog, wl: WatchLog | None) -> tuple[list[list[Any]], list[int | None]]:
    """The Video tab's one step table (STEP_HEADERS): each step with its stream time, when it was
    said, and, once its engine step is scored, the frame it relied on most and the best region
    there; plus per row the engine step index a click shows the heatmap of (None: not scored)."""
    rows = log.rows()
    closed = [r for r in rows if not str(r[3]).endswith(" …")]
    hits = align_steps([r[3] for r in closed], wl.steps if wl is not None else [])
    hits += [None] * (len(rows) - len(closed))
    table, ids = [], []
    for (n, st, said, text), hit in zip(rows, hits):
        frame, region = ("…", "…") if hit is None else wl.relied_on(hit)
        table.append([n, st, said, frame, region, text])
        ids.append(None if hit is None else hit.step)
    return table, ids
