"""TaYS frame sources: decord round trip of our own MP4s, the PyAV fallback, real-time pacing,
one-line errors for bad files, the push source (the webcam) and its frame checks."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from PIL import Image

import tays.sources as sources
from tays.sources import (
    FrameChecker,
    IterableSource,
    PushSource,
    ShapesSource,
    StreamError,
    VideoFileSource,
    decord_available,
)
from vstream.world.shapes_video import make_stream

needs_decord = pytest.mark.skipif(not decord_available(), reason="decord is not installed")


def _tays_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("tays-") and t.is_alive()]


@pytest.fixture(scope="module")
def stream():
    return make_stream(11, duration=6.0)


@pytest.fixture(scope="module")
def mp4(tmp_path_factory, stream) -> str:
    return stream.to_mp4(tmp_path_factory.mktemp("video") / "stream.mp4", fps=10)


def _diff(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float32) - np.asarray(b, dtype=np.float32)).mean())


def _check_round_trip(src: VideoFileSource, stream) -> None:
    assert src.frame_size == (224, 224)
    assert src.duration == pytest.approx(stream.duration, abs=0.02)
    items = list(src)
    assert [t for t, _ in items] == pytest.approx(stream.frame_times(2.0))
    truth = {t: np.asarray(stream.frame_at(t)) for t in stream.frame_times(2.0)}
    for t, f in items:
        assert f.shape == (224, 224, 3) and f.dtype == np.uint8
        d = _diff(f, truth[t])
        assert d < 3.0, (t, d)
        # and it is the right frame: no other distinct frame of the stream is as close
        others = [_diff(f, v) for tt, v in truth.items() if _diff(v, truth[t]) > 1.0]
        assert all(d < o for o in others), t


@needs_decord
def test_decord_round_trip(mp4, stream):
    src = VideoFileSource(mp4, fps=2.0, realtime=False)
    assert src.backend == "decord" and src.native_fps == pytest.approx(10.0)
    _check_round_trip(src, stream)


def test_pyav_backend_round_trip(mp4, stream):
    src = VideoFileSource(mp4, fps=2.0, realtime=False, backend="pyav")
    assert src.backend == "pyav"
    _check_round_trip(src, stream)


def test_pyav_only_where_decord_is_missing(mp4, monkeypatch):
    if decord_available():
        assert VideoFileSource(mp4, fps=2.0, realtime=False).backend == "decord"
    monkeypatch.setattr(sources, "decord_available", lambda: False)
    assert VideoFileSource(mp4, fps=2.0, realtime=False).backend == "pyav"


@needs_decord
def test_resampling_by_timestamp(mp4, stream):
    """fps above the file's rate repeats frames; below it skips them; times are k / fps."""
    hi = list(VideoFileSource(mp4, fps=20.0, realtime=False))
    assert len(hi) == 120 and hi[1][0] == pytest.approx(0.05)
    assert np.array_equal(hi[0][1], hi[1][1])  # 0.00 and 0.05 s show the same 10 FPS frame
    lo = list(VideoFileSource(mp4, fps=0.5, realtime=False))
    assert [t for t, _ in lo] == pytest.approx([0.0, 2.0, 4.0])


def test_realtime_pacing(stream):
    speed = 12.0
    src = ShapesSource(stream, fps=2.0, realtime=True, speed=speed)
    t0 = time.perf_counter()
    late = []
    for t, _ in src.iter_frames(t0=t0):
        now = time.perf_counter() - t0
        assert now >= t / speed - 1e-3
        late.append(now - t / speed)
    end = time.perf_counter() - t0
    assert end >= stream.duration / speed - 1e-3  # the stream lasts until its end
    assert np.median(late) < 0.05


def test_realtime_stop_interrupts(stream):
    stop = threading.Event()
    src = ShapesSource(stream, fps=2.0, realtime=True)  # 6 s in real time
    it = src.iter_frames(stop=stop)
    next(it)
    threading.Timer(0.1, stop.set).start()
    t = time.perf_counter()
    assert list(it) == []
    assert time.perf_counter() - t < 1.0


def test_shapes_source_events(stream):
    src = ShapesSource(stream, fps=2.0, realtime=False)
    assert len(src.events) == len(stream.events)
    for ev, e in zip(src.events, stream.events):
        assert ev.time == e.time and ev.shape == e.shape and e.color in ev.colors


# -- bad files: one-line errors ----------------------------------------------------------------


def _one_line_error(path, match: str) -> str:
    with pytest.raises(StreamError, match=match) as ei:
        VideoFileSource(path, fps=2.0, realtime=False)
    msg = str(ei.value)
    assert "\n" not in msg and len(msg) < 400
    assert not _tays_threads()
    return msg


def test_missing_file(tmp_path):
    _one_line_error(tmp_path / "nope.mp4", "not found")


def test_zero_length_file(tmp_path):
    p = tmp_path / "empty.mp4"
    p.write_bytes(b"")
    assert "empty.mp4" in _one_line_error(p, "empty")


def test_text_file_renamed_mp4(tmp_path):
    p = tmp_path / "notes.mp4"
    p.write_text("this is not a video\n" * 50)
    assert "notes.mp4" in _one_line_error(p, "corrupt|unsupported")


def test_corrupt_file(tmp_path, mp4):
    """Random bytes, and a real MP4 with its middle overwritten."""
    p = tmp_path / "noise.mp4"
    p.write_bytes(np.random.default_rng(0).integers(0, 256, 20_000, dtype=np.uint8).tobytes())
    _one_line_error(p, "corrupt|unsupported")
    data = bytearray(open(mp4, "rb").read())
    cut = tmp_path / "truncated.mp4"
    cut.write_bytes(bytes(data[: len(data) // 3]))  # the moov atom (at the end) is gone
    _one_line_error(cut, "corrupt|unsupported")


def _write_with_codec(path, codec: str, stream, **opts) -> bool:
    import av

    try:
        with av.open(str(path), "w") as out:
            vs = out.add_stream(codec, rate=10)
            vs.width, vs.height = 224, 224
            vs.pix_fmt = opts.pop("pix_fmt", "yuv420p")
            vs.options = opts
            for _, img in stream.frames(10)[:10]:
                for pkt in vs.encode(av.VideoFrame.from_ndarray(np.asarray(img), format="rgb24")):
                    out.mux(pkt)
            for pkt in vs.encode():
                out.mux(pkt)
    except Exception:
        return False
    return path.is_file() and path.stat().st_size > 0


UNSUPPORTED_CODECS = [("libaom-av1", {"cpu-used": "8"}), ("libsvtav1", {}), ("librav1e", {})]


@needs_decord
def test_unsupported_codec(tmp_path, stream):
    """A file PyAV writes with a codec decord 0.6.0's FFmpeg cannot decode (AV1)."""
    for codec, opts in UNSUPPORTED_CODECS:
        p = tmp_path / f"clip-{codec}.mp4"
        if _write_with_codec(p, codec, stream, **dict(opts)):
            msg = _one_line_error(p, "unsupported|corrupt")
            assert p.name in msg
            # PyAV (newer FFmpeg) reads it: the file itself is fine
            assert len(list(VideoFileSource(p, fps=2.0, realtime=False, backend="pyav"))) == 2
            return
    pytest.skip("this PyAV build has no AV1 encoder")


def test_bad_arguments(mp4):
    with pytest.raises(StreamError, match="fps"):
        VideoFileSource(mp4, fps=0)
    with pytest.raises(StreamError, match="backend"):
        VideoFileSource(mp4, backend="opencv")


# -- frame checks and the push source -----------------------------------------------------------


def test_frame_checker_one_size_per_stream():
    chk = FrameChecker()
    a = chk(Image.new("RGB", (224, 224)))
    assert a.size == (224, 224)
    chk(np.zeros((224, 224, 3), np.uint8))  # arrays are fine too
    with pytest.raises(StreamError, match=r"frame 2 .*rejected.*320x240.*224x224"):
        chk(Image.new("RGB", (320, 240)))
    with pytest.raises(StreamError, match="rejected"):
        chk("not an image")
    chk(Image.new("RGB", (224, 224)))  # still usable
    assert (chk.accepted, chk.rejected) == (3, 2)


def test_push_source_from_a_thread():
    src = PushSource(fps=2.0)
    frames = [Image.new("RGB", (64, 64), (i * 20, 0, 0)) for i in range(5)]

    def producer():
        for i, f in enumerate(frames):
            assert src.push(f, t=i * 0.5)
        src.end()

    th = threading.Thread(target=producer)
    th.start()
    got = list(src)
    th.join()
    assert [t for t, _ in got] == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert [f.getpixel((0, 0)) for _, f in got] == [f.getpixel((0, 0)) for f in frames]
    with pytest.raises(StreamError, match="ended"):
        src.push(frames[0], t=3.0)


def test_push_source_rate_limit_and_bad_frames():
    src = PushSource(fps=2.0)
    img = Image.new("RGB", (64, 64))
    assert src.push(img, t=0.0)
    assert not src.push(img, t=0.2)  # a 30 FPS webcam feeding a 2 FPS stream: dropped
    with pytest.raises(StreamError, match="rejected.*32x32.*64x64"):
        src.push(Image.new("RGB", (32, 32)), t=0.5)
    assert src.push(img, t=0.5)  # the source goes on
    src.end()
    assert [t for t, _ in src] == [0.0, 0.5]
    assert (src.accepted, src.dropped) == (2, 1)


def test_push_source_stops_early():
    src = PushSource(fps=2.0, idle_timeout=0.2)
    src.push(Image.new("RGB", (64, 64)), t=0.0)
    it = iter(src)
    assert next(it)[0] == 0.0
    with pytest.raises(StreamError, match="stopped early: no frame for 0.2 s after t=0.00 s"):
        next(it)


def test_iterable_source_times():
    frames = [Image.new("RGB", (64, 64)) for _ in range(3)]
    assert [t for t, _ in IterableSource(frames, fps=4.0)] == [0.0, 0.25, 0.5]
    assert [t for t, _ in IterableSource([(1.0, frames[0]), (3.0, frames[1])])] == [1.0, 3.0]
