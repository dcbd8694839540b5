"""Frame sources for the TaYS engine and the paradigm runner (issue item 4).

Every source yields ``(t, frame)`` pairs: ``t`` is the stream time in seconds, ``frame`` an RGB
PIL image (or an HxWx3 array the engine normalises). Sources share one iteration protocol:

    src = VideoFileSource("clip.mp4", fps=2.0, realtime=True)   # decord (PyAV fallback)
    src = ShapesSource(make_stream(7), fps=2.0)                  # shapes-world stream, with events
    src = PushSource(fps=2.0)                                    # the app's webcam: src.push(img)
    src = IterableSource(frames, fps=2.0)                        # any list/iterator of frames
    for t, frame in src.iter_frames(stop=event, t0=time.perf_counter()):
        ...

Real time: with ``realtime=True`` a frame of stream time ``t`` is released at wall time
``t0 + t / speed`` and, after the last frame, the iterator returns at ``t0 + duration / speed``
(the end of the last frame's display interval), so a replayed file or synthetic stream behaves
like a live one. With ``realtime=False`` frames come as fast as they can be decoded (the
consumer applies back-pressure). `PushSource` is live by nature: frames come when pushed.

Bounded memory: files are decoded in small chunks and synthetic frames rendered on demand, so
an hour-long source never holds more than a few frames.

Errors are `StreamError`s (a `vstream.model.VLMError`, so the message is one line) naming the
file and what went wrong: missing, empty (0 bytes), corrupt or unsupported codec (checked when the
source is opened, by decoding its first frame), a decode failure mid-file ("ended early"), a frame
of a different size or type than the stream's first one (rejected, the stream goes on), and a live
stream that stops sending frames (``idle_timeout``).

Backends: decord 0.6.0 reads video files; PyAV is used only where decord cannot be imported
(decord has wheels for Linux x86-64 only), or when asked for (``backend="pyav"``).
Resampling to ``fps`` is by timestamp: the frame shown at ``k / fps`` (the last one that started
at or before it), for every ``k / fps`` before the end of the video.
"""

from __future__ import annotations

import math
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vstream.model import VLMError, normalize_image_with_size
from vstream.world.shapes import COLORS
from vstream.world.shapes_video import Stream, make_stream

__all__ = [
    "EventTruth",
    "FrameChecker",
    "FrameSource",
    "IterableSource",
    "PushSource",
    "ShapesSource",
    "StreamError",
    "VideoFileSource",
    "decord_available",
]

_CHUNK = 8  # frames decoded per decord call


class StreamError(VLMError):
    """Bad video input or a broken stream. One line, shown verbatim in the UI."""


@dataclass(frozen=True)
class EventTruth:
    """A ground-truth event of a stream: when it happened and the words that name it."""

    time: float
    text: str  # e.g. "The red circle moves to the left."
    kind: str = ""  # appear / move / recolor / disappear
    shape: str = ""
    colors: tuple[str, ...] = ()  # every colour the object had around the event


def decord_available() -> bool:
    try:
        import decord  # noqa: F401
    except Exception:  # ImportError, or a broken native library
        return False
    return True


# ----------------------------------------------------------------------------------------------
# frame checks


class FrameChecker:
    """Normalises frames to RGB PIL images and enforces one size per stream.

    The first frame fixes the size; a later frame of another size (as given) or one that
    cannot be read is refused with a StreamError, and the checker stays usable for the next
    frame. Frames reach the engine only through here, so a bad frame never reaches ingestion.
    """

    def __init__(self) -> None:
        self.size: tuple[int, int] | None = None  # (w, h) as given
        self.accepted = 0
        self.rejected = 0

    def __call__(self, frame: Any, t: float | None = None) -> Image.Image:
        where = f"frame {self.accepted + self.rejected}" + ("" if t is None else f" (t={t:.2f} s)")
        try:
            img, orig = normalize_image_with_size(frame)
        except VLMError as e:
            self.rejected += 1
            raise StreamError(f"{where} rejected: {e}") from e
        if self.size is None:
            self.size = orig
        elif orig != self.size:
            self.rejected += 1
            raise StreamError(
                f"{where} rejected: it is {orig[0]}x{orig[1]} but the stream's frames are {self.size[0]}x{self.size[1]}"
            )
        self.accepted += 1
        return img


# ----------------------------------------------------------------------------------------------
# the common protocol


class FrameSource:
    """Base class: subclasses implement `_frames()` (unpaced (t, frame) pairs)."""

    fps: float = 2.0
    realtime: bool = False
    speed: float = 1.0
    duration: float | None = None  # seconds of stream, when known
    events: list[EventTruth] | None = None  # ground truth, when known
    name: str = "stream"

    def _frames(self) -> Iterator[tuple[float, Any]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def iter_frames(self, stop: threading.Event | None = None, t0: float | None = None) -> Iterator[tuple[float, Any]]:
        """(t, frame) pairs, paced to the wall clock from `t0` when `realtime` (see module doc).
        Returns early, silently, when `stop` is set."""
        stop = stop if stop is not None else threading.Event()
        t0 = time.perf_counter() if t0 is None else float(t0)
        speed = float(self.speed)
        for t, frame in self._frames():
            if stop.is_set():
                return
            if self.realtime:
                delay = t0 + t / speed - time.perf_counter()
                if delay > 0 and stop.wait(delay):
                    return
            yield t, frame
        if self.realtime and self.duration is not None:
            delay = t0 + self.duration / speed - time.perf_counter()
            if delay > 0:
                stop.wait(delay)

    def __iter__(self) -> Iterator[tuple[float, Any]]:
        return self.iter_frames()

    def close(self) -> None:
        pass

    def __enter__(self) -> FrameSource:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, fps={self.fps}, realtime={self.realtime})"


def _check_fps(fps: float) -> float:
    fps = float(fps)
    if not (fps > 0 and math.isfinite(fps)):
        raise StreamError(f"fps must be a positive number, got {fps}")
    return fps


def _check_speed(speed: float) -> float:
    speed = float(speed)
    if not (speed > 0 and math.isfinite(speed)):
        raise StreamError(f"speed must be a positive number, got {speed}")
    return speed


# ----------------------------------------------------------------------------------------------
# synthetic and in-memory sources


class ShapesSource(FrameSource):
    """A shapes-world stream (`vstream.world.shapes_video.Stream` or a seed), rendered frame by frame
    at `fps`; its events are the ground truth for the reasoning-event deviation."""

    def __init__(self, stream: Stream | int, fps: float = 2.0, realtime: bool = True, speed: float = 1.0):
        self.stream = make_stream(int(stream)) if isinstance(stream, (int, np.integer)) else stream
        self.fps = _check_fps(fps)
        self.realtime = bool(realtime)
        self.speed = _check_speed(speed)
        self.duration = float(self.stream.duration)
        self.name = f"shapes-{self.stream.seed}"
        self.question = self.stream.question
        self.events = []
        for e in self.stream.events:
            words = set(e.step.lower().rstrip(".").split())
            colors = tuple(sorted({c for c in COLORS if c in words} | {e.color}))
            self.events.append(EventTruth(float(e.time), e.step, e.kind, e.shape, colors))

    def _frames(self) -> Iterator[tuple[float, Any]]:
        for t in self.stream.frame_times(self.fps):
            yield t, self.stream.frame_at(t)


class IterableSource(FrameSource):
    """Any iterable of frames or of (t, frame) pairs (bare frames get t = i / fps)."""

    def __init__(
        self,
        frames: Iterable[Any],
        fps: float = 2.0,
        realtime: bool = False,
        speed: float = 1.0,
        duration: float | None = None,
        events: list[EventTruth] | None = None,
        name: str = "frames",
    ):
        self._items = frames
        self.fps = _check_fps(fps)
        self.realtime = bool(realtime)
        self.speed = _check_speed(speed)
        self.duration = None if duration is None else float(duration)
        self.events = events
        self.name = name

    def _frames(self) -> Iterator[tuple[float, Any]]:
        for i, item in enumerate(self._items):
            if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], (int, float, np.floating)):
                yield float(item[0]), item[1]
            else:
                yield i / self.fps, item


_END = object()


class PushSource(FrameSource):
    """Frames pushed one by one from any thread (the app's webcam), consumed by one reader.

    push(frame, t=None): t defaults to the wall time since the first push. Frames closer than
    1/fps after the last accepted one are dropped (a 30 FPS webcam feeds a 2 FPS stream), and so
    are frames that find the queue full (the consumer is behind); push() returns False then.
    A frame that cannot be read or has another size than the first raises StreamError at once
    (the source stays usable). end() ends the stream. With `idle_timeout`, a reader that gets no
    frame for that long stops with a StreamError ("stopped early").
    """

    def __init__(
        self,
        fps: float = 2.0,
        max_queue: int = 256,
        idle_timeout: float | None = None,
        rate_limit: bool = True,
        name: str = "push",
    ):
        self.fps = _check_fps(fps)
        self.realtime = True
        self.duration = None
        self.name = name
        self.idle_timeout = None if idle_timeout is None else float(idle_timeout)
        self.rate_limit = bool(rate_limit)
        self._q: queue.Queue = queue.Queue(maxsize=max(1, int(max_queue)))
        self._lock = threading.Lock()
        self._check = FrameChecker()
        self._t_first: float | None = None
        self._last_t = -math.inf
        self._ended = False
        self.dropped = 0
        self.accepted = 0

    def push(self, frame: Any, t: float | None = None) -> bool:
        with self._lock:
            if self._ended:
                raise StreamError("the stream has ended: no more frames can be pushed")
            now = time.perf_counter()
            if self._t_first is None:
                self._t_first = now
            t = now - self._t_first if t is None else float(t)
            if self.rate_limit and t < self._last_t + 1.0 / self.fps - 1e-6:
                self.dropped += 1
                return False
            if t < self._last_t:
                raise StreamError(f"frame time {t:.3f} s goes back (last frame at {self._last_t:.3f} s)")
            img = self._check(frame, t)  # raises on a bad frame; state unchanged
            try:
                self._q.put_nowait((t, img))
            except queue.Full:
                self.dropped += 1
                return False
            self._last_t = t
            self.accepted += 1
            return True

    def end(self) -> None:
        with self._lock:
            if self._ended:
                return
            self._ended = True
        self._q.put(_END)  # blocks only while the queue is full, i.e. until the reader takes one

    @property
    def ended(self) -> bool:
        return self._ended

    def close(self) -> None:
        with self._lock:
            self._ended = True
        try:
            self._q.put_nowait(_END)
        except queue.Full:
            pass

    def _frames(self) -> Iterator[tuple[float, Any]]:
        return self.iter_frames()

    def iter_frames(self, stop: threading.Event | None = None, t0: float | None = None) -> Iterator[tuple[float, Any]]:
        """Frames as they are pushed (never paced); wakes up every 50 ms to honour `stop`."""
        stop = stop if stop is not None else threading.Event()
        last = None
        idle_since = time.perf_counter()
        while not stop.is_set():
            try:
                item = self._q.get(timeout=0.05)
            except queue.Empty:
                if self.idle_timeout is not None and time.perf_counter() - idle_since > self.idle_timeout:
                    where = "before the first frame" if last is None else f"after t={last:.2f} s"
                    raise StreamError(
                        f"the stream stopped early: no frame for {self.idle_timeout:g} s {where}"
                    ) from None
                continue
            if item is _END:
                return
            last = item[0]
            idle_since = time.perf_counter()
            yield item


# ----------------------------------------------------------------------------------------------
# video files


def _short(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    # decord wraps FFmpeg's words in "[hh:mm:ss] file.cc:NN: Check failed: ... ERROR ..." and
    # may append a C++ stack trace; keep the words
    msg = msg.split("Stack trace")[0]
    msg = re.sub(r"\[\d+:\d+:\d+\] \S+:\d+: ", "", msg)
    if "ERROR " in msg:
        msg = msg.split("ERROR ", 1)[1]
    msg = msg.strip(" :")
    if len(msg) > 160:
        msg = msg[:157] + "..."
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


class _DecordReader:
    backend = "decord"

    def __init__(self, path: str):
        import decord

        self.vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
        self.n = len(self.vr)
        if self.n > 0:
            ts = np.asarray(self.vr.get_frame_timestamp(np.arange(self.n)), dtype=np.float64).reshape(self.n, 2)
            self.starts = ts[:, 0]
            last_start, last_end = float(ts[-1, 0]), float(ts[-1, 1])
            self.end = last_end if last_end > last_start else last_start + 1.0 / max(self.vr.get_avg_fps(), 1e-6)
        else:
            self.starts, self.end = np.zeros(0), 0.0
        self.native_fps = float(self.vr.get_avg_fps())

    def first(self) -> np.ndarray:
        return self.vr[0].asnumpy()

    def native(self) -> tuple[list[float], Callable[[int], np.ndarray]]:
        return [float(t) for t in self.starts], lambda i: self.vr[i].asnumpy()

    def frames(self, fps: float, name: str) -> Iterator[tuple[float, np.ndarray]]:
        times = [k / fps for k in range(int(math.ceil(self.end * fps - 1e-9)))]
        idx = np.clip(np.searchsorted(self.starts, np.asarray(times) + 1e-9, side="right") - 1, 0, self.n - 1)
        for a in range(0, len(times), _CHUNK):
            chunk = idx[a : a + _CHUNK]
            uniq = sorted(set(int(i) for i in chunk))
            try:
                arr = self.vr.get_batch(uniq).asnumpy()
            except Exception as e:
                raise StreamError(
                    f"video {name} ended early: could not decode frame {uniq[0]} of {self.n} "
                    f"(t={times[a]:.2f} s): {_short(e)}"
                ) from e
            pos = {i: j for j, i in enumerate(uniq)}
            for k, i in enumerate(chunk):
                yield times[a + k], arr[pos[int(i)]]


class _PyAVReader:
    backend = "pyav"

    def __init__(self, path: str):
        import av

        self.path = path
        with av.open(path) as c:
            if not c.streams.video:
                raise StreamError(f"{os.path.basename(path)} has no video stream")
            s = c.streams.video[0]
            rate = float(s.average_rate or s.guessed_rate or 0) or None
            self.native_fps = rate or 0.0
            dur = None
            if s.duration is not None and s.time_base is not None:
                dur = float(s.duration * s.time_base)
            elif c.duration is not None:
                dur = c.duration / 1_000_000
            self.end = dur
            self.n = int(s.frames) if s.frames else None

    def first(self) -> np.ndarray:
        import av

        with av.open(self.path) as c:
            for f in c.decode(video=0):
                return f.to_ndarray(format="rgb24")
        raise StreamError(f"{os.path.basename(self.path)} has no decodable video frame")

    def native(self) -> tuple[list[float], Callable[[int], np.ndarray]]:
        import av

        times, arrays = [], []  # decoded once: annotation clips are short
        with av.open(self.path) as c:
            for i, f in enumerate(c.decode(video=0)):
                times.append(float(f.time) if f.time is not None else i / max(self.native_fps, 1e-6))
                arrays.append(f.to_ndarray(format="rgb24"))
        return times, arrays.__getitem__

    def frames(self, fps: float, name: str) -> Iterator[tuple[float, np.ndarray]]:
        import av

        k, prev, prev_t, i = 0, None, None, 0
        step = 1.0 / self.native_fps if self.native_fps else 1.0 / fps
        try:
            with av.open(self.path) as c:
                for f in c.decode(video=0):
                    ft = float(f.time) if f.time is not None else i * step
                    # every target time before this frame's start shows the previous frame
                    while prev is not None and k / fps < ft - 1e-9:
                        yield k / fps, prev
                        k += 1
                    prev, prev_t, i = f.to_ndarray(format="rgb24"), ft, i + 1
        except StreamError:
            raise
        except Exception as e:
            raise StreamError(
                f"video {name} ended early: could not decode frame {i} (t~{k / fps:.2f} s): {_short(e)}"
            ) from e
        if prev is None:
            return
        end = self.end if self.end is not None and self.end > prev_t else prev_t + step
        while k / fps < end - 1e-9:
            yield k / fps, prev
            k += 1


class VideoFileSource(FrameSource):
    """A video file, resampled to `fps` by timestamp and replayed in real time (`realtime`,
    `speed`) or as fast as it decodes. Opening checks the file and decodes its first frame, so
    a missing, empty, corrupt or undecodable file fails here with a one-line StreamError."""

    def __init__(
        self,
        path: str | os.PathLike,
        fps: float = 2.0,
        realtime: bool = True,
        speed: float = 1.0,
        backend: str = "auto",
        events: list[EventTruth] | None = None,
    ):
        self.path = str(path)
        self.name = os.path.basename(self.path) or self.path
        self.fps = _check_fps(fps)
        self.realtime = bool(realtime)
        self.speed = _check_speed(speed)
        self.events = events
        p = Path(self.path)
        if not p.is_file():
            raise StreamError(f"video file not found: {self.path}")
        if p.stat().st_size == 0:
            raise StreamError(f"video file {self.name} is empty (0 bytes)")
        if backend == "auto":
            backend = "decord" if decord_available() else "pyav"
        if backend not in ("decord", "pyav"):
            raise StreamError(f"unknown video backend {backend!r}; use 'decord', 'pyav' or 'auto'")
        self.backend = backend
        try:
            self._reader = _DecordReader(self.path) if backend == "decord" else _PyAVReader(self.path)
        except StreamError:
            raise
        except Exception as e:
            raise StreamError(
                f"could not open video {self.name}: corrupt file or unsupported format ({_short(e)})"
            ) from e
        if self._reader.n == 0:
            raise StreamError(f"video {self.name} has no frames")
        try:
            first = self._reader.first()
        except StreamError:
            raise
        except Exception as e:
            raise StreamError(
                f"could not decode video {self.name}: unsupported codec or corrupt data ({_short(e)})"
            ) from e
        if first is None or np.asarray(first).size == 0:
            raise StreamError(f"could not decode video {self.name}: its first frame is empty")
        self.frame_size = (int(first.shape[1]), int(first.shape[0]))
        self.native_fps = self._reader.native_fps
        self.duration = None if self._reader.end is None else float(self._reader.end)

    def _frames(self) -> Iterator[tuple[float, Any]]:
        yield from self._reader.frames(self.fps, self.name)

    def native_frames(self) -> tuple[list[float], Callable[[int], np.ndarray]]:
        """The file's own frames, not resampled: their start times and a getter by index (RGB)."""
        return self._reader.native()
