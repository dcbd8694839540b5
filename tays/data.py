"""TaYS data construction: (video, keyframes with time intervals and descriptions, question) ->
streaming chain-of-thought trajectories (issue 5, item 1).

    samples = shapes_samples("train", 0, 100)                 # or load_videoespresso("anno.json")
    trajs, skipped = build_trajectories(samples)              # skipped: Counter of skip reasons
    t = trajs[0]
    t.sample_times, t.source_times     # the 2 FPS grid and the video time each sample shows
    t.steps                            # kept (question, reasoning step, answer) triplets, with times
    t.frames()                         # [(sample time, PIL frame)] at 2 FPS

The four steps of the TaYS write-up:

1. Frame alignment (`align_frames`): the video is resampled to ``fps`` (2) by timestamp. Sample
   k has time ``k / fps`` (the write-up's ``0.5 (t' - 1)``) for every such time before the end of
   the video. A sample time inside a keyframe interval ``[start, end]`` (both ends included)
   takes that keyframe's frame (the frame at the keyframe's own timestamp ``time``); inside
   several intervals, the one that starts first (then the one listed first). Any other sample
   time takes the nearest native frame (a tie goes to the earlier frame); a source rendered on
   demand, like a shapes-world stream, has a frame at every time, so it takes the frame at the
   sample time itself.
2. Trajectories (`make_triplets`, `place_steps`): one (question, reasoning step, answer) triplet
   per keyframe: the step is the keyframe's description (one sentence), the question a temporal
   localisation question about it, the answer a short one. Keyframes whose annotation carries a
   question/answer keep theirs; shapes-world keyframes get templated ones (``"What color does the
   circle turn at 4.5 s?"`` -> ``"blue"``). Each step is placed at the end of a frame group
   (``group_size`` consecutive samples, the model's temporal patch: 2), the first group whose
   time (its last sample's time) is at or after the keyframe's timestamp, whose frames all show
   video content from no later than that time, and after the group of the previous step (at most
   one step per group, in time order). A step's ``time`` is that group time (or, where a
   keyframe frame shown early makes it later, the newest content time), so every frame a step
   can see (sample time and source time) is at or before it: strict causality.
3. Quality control (`consistency_filter`): cosine of the sentence embeddings of the triplet's
   question and its step; triplets below ``threshold`` are dropped. The default encoder is
   `TfidfEncoder`, a deterministic, offline TF-IDF (scikit-learn, content words, sublinear tf)
   fitted on the texts it is given (all questions and steps of the samples being built), a
   lexical stand-in for BGE-M3; `HFEncoder` runs a Hugging Face encoder (e.g. ``BAAI/bge-m3``,
   CLS pooling, L2-normalised, as BGE-M3's dense retrieval) when it can be loaded, else raises a
   one-line `EncoderError`. A sample whose every step is dropped is skipped.
4. The end-of-step token `vstream.model.END_OF_STEP` (``<|eot|>``, a special token of our tokenizers,
   see `vstream.world.tokenizer`) follows every reasoning sentence when the trajectory is tokenised
   (`tays.train`).

Bad input never stops a run: a sample with missing annotation fields, keyframes out of order, a
timestamp outside the video or an interval that does not hold its keyframe, an unreadable
video, no keyframes, or no step left after filtering is skipped; the reason is logged (logger
``tays.data``) and counted in the returned `collections.Counter`.

VideoEspresso-style annotation JSON (`load_videoespresso`). Fields seen in the public
VideoEspresso evaluation script: ``video_path``, ``question``, ``options``, ``correct_answer``,
``evidence``, ``task``. The keyframe-level fields of its training annotations are not public in
a form we could check, so we assume (and document) this layout, accepting a few aliases:

    [{"video_id": "clip-1",                      # optional (default: the video file's stem)
      "video_path": "clip-1.mp4",                # relative to the JSON file's folder
      "question": "...", "answer": "...",        # or "correct_answer" (+ "options": ["(A) ..", ..])
      "task": "...", "evidence": "...",          # optional, kept as metadata
      "keyframes": [                             # or "key_frames"; in time order
        {"start": 1.0, "end": 2.0,               # keyframe interval (s); or "interval": [s, e]
         "time": 1.5,                            # or "timestamp"; default: start
         "description": "A man opens the door.", # or "caption" / "step": the reasoning step
         "question": "...", "answer": "..."}]}]  # optional triplet question / answer
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tays.sources import ShapesSource, VideoFileSource
from vstream.world.shapes_video import Stream, streams

log = logging.getLogger("tays.data")

__all__ = [
    "DEFAULT_FPS",
    "DEFAULT_THRESHOLD",
    "EncoderError",
    "HFEncoder",
    "Keyframe",
    "Step",
    "TfidfEncoder",
    "Trajectory",
    "VideoSample",
    "align_frames",
    "build_dataset",
    "build_trajectories",
    "build_trajectory",
    "consistency_filter",
    "cosine",
    "load_videoespresso",
    "make_encoder",
    "place_steps",
    "resample_times",
    "shapes_encoder",
    "shapes_sample",
    "shapes_samples",
    "shapes_triplet",
    "SkipSample",
    "trajectory_record",
]

DEFAULT_FPS = 2.0
DEFAULT_THRESHOLD = 0.4  # TF-IDF cosine: shapes-world triplets score >= 0.5, another object ~0.2-0.35, unrelated 0
EPS = 1e-6


class SkipSample(Exception):
    """A sample cannot be used: `reason` is a short counter key, the message says why."""

    def __init__(self, reason: str, message: str = ""):
        super().__init__(message or reason)
        self.reason = reason


class EncoderError(RuntimeError):
    """A sentence encoder could not be loaded (one line)."""


# ----------------------------------------------------------------------------------------------
# records


@dataclass(frozen=True)
class Keyframe:
    start: float  # keyframe interval [start, end], seconds
    end: float
    time: float  # the keyframe's own timestamp (the frame it stands for); start <= time <= end
    description: str  # the reasoning step: one sentence
    question: str = ""  # the triplet's question (made up when empty)
    answer: str = ""


@dataclass
class VideoSample:
    """One annotated video: what `build_trajectory` consumes."""

    video_id: str
    question: str
    answer: str
    duration: float
    keyframes: list[Keyframe]
    read_frame: Callable[[float], Any]  # native timestamp -> RGB PIL image
    native_times: list[float] | None = None  # native frame timestamps (None: a frame at any time)
    events: list[Any] | None = None  # ground truth for the event deviation (tays.sources.EventTruth)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Step:
    """A kept triplet placed in the stream."""

    question: str
    text: str  # the reasoning step (one sentence, without the end-of-step token)
    answer: str
    keyframe: int  # index into the sample's keyframes
    group: int  # frame group after which it is emitted (0-based)
    time: float  # stream time it is emitted at (>= every frame it can see)
    consistency: float  # question/step cosine


@dataclass
class Trajectory:
    video_id: str
    question: str
    answer: str
    duration: float
    fps: float
    group_size: int
    sample_times: list[float]
    source_times: list[float]  # native time of the frame each sample shows
    keyframe_of: list[int | None]  # keyframe a sample took (None: nearest frame)
    steps: list[Step]
    dropped: list[Step]  # removed by the consistency filter
    read_frame: Callable[[float], Any] = field(repr=False, default=None)
    events: list[Any] | None = None

    @property
    def n_groups(self) -> int:
        return math.ceil(len(self.sample_times) / self.group_size)

    def group_time(self, g: int) -> float:
        """Stream time of frame group g: its last sample's time (the engine's convention)."""
        return self.sample_times[min(len(self.sample_times), (g + 1) * self.group_size) - 1]

    def group_content_time(self, g: int) -> float:
        """Newest native time shown by frame groups 0..g."""
        return max(self.source_times[: min(len(self.source_times), (g + 1) * self.group_size)])

    def frames(self) -> list[tuple[float, Any]]:
        """[(sample time, frame)] at `fps` (frames read on demand)."""
        cache: dict[float, Any] = {}
        out = []
        for t, s in zip(self.sample_times, self.source_times):
            if s not in cache:
                cache[s] = self.read_frame(s)
            out.append((t, cache[s]))
        return out

    def visible_frames(self, step: Step) -> list[int]:
        """Sample indices a step can see (the frame groups up to and including its group)."""
        return list(range(min(len(self.sample_times), (step.group + 1) * self.group_size)))


# ----------------------------------------------------------------------------------------------
# 1. frame alignment


def resample_times(duration: float, fps: float = DEFAULT_FPS) -> list[float]:
    """0, 1/fps, 2/fps, ... strictly before `duration`."""
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    n = math.ceil(float(duration) * fps - 1e-9)
    return [k / fps for k in range(max(0, n))]


def align_frames(
    sample_times: Sequence[float],
    keyframes: Sequence[Keyframe],
    native_times: Sequence[float] | None = None,
) -> tuple[list[float], list[int | None]]:
    """(source time per sample, keyframe index per sample or None); rule in the module docstring."""
    order = sorted(range(len(keyframes)), key=lambda i: (keyframes[i].start, i))
    nat = None if native_times is None else np.asarray(sorted(native_times), dtype=np.float64)
    src: list[float] = []
    kfo: list[int | None] = []
    for t in sample_times:
        hit = next((i for i in order if keyframes[i].start - EPS <= t <= keyframes[i].end + EPS), None)
        if hit is not None:
            src.append(float(keyframes[hit].time))
            kfo.append(hit)
            continue
        kfo.append(None)
        if nat is None or not len(nat):
            src.append(float(t))
            continue
        j = int(np.searchsorted(nat, t))
        cands = [k for k in (j - 1, j) if 0 <= k < len(nat)]
        best = min(cands, key=lambda k: (abs(nat[k] - t), k))
        src.append(float(nat[best]))
    return src, kfo


# ----------------------------------------------------------------------------------------------
# 2. triplets and placement


def place_steps(
    keyframes: Sequence[Keyframe],
    sample_times: Sequence[float],
    source_times: Sequence[float],
    group_size: int,
) -> list[tuple[int, float] | None]:
    """(group, time) of each keyframe's step, in keyframe order (rule in the module docstring);
    None when the video ends before a causal place for it."""
    n = len(sample_times)
    G = math.ceil(n / group_size)
    gtime = [sample_times[min(n, (g + 1) * group_size) - 1] for g in range(G)]
    content, run = [], -math.inf
    for g in range(G):
        run = max([run, *source_times[g * group_size : min(n, (g + 1) * group_size)]])
        content.append(run)
    out: list[tuple[int, float] | None] = []
    prev = -1
    for kf in keyframes:
        g = prev + 1
        while g < G and not (gtime[g] >= kf.time - EPS and content[g] <= gtime[g] + EPS):
            g += 1
        if g >= G:
            # the last group, if the keyframe is shown there: the step then waits for its content
            if G and prev < G - 1 and content[G - 1] >= kf.time - EPS:
                g = G - 1
                out.append((g, max(gtime[g], content[g])))
                prev = g
            else:
                out.append(None)
            continue
        out.append((g, max(gtime[g], content[g])))
        prev = g
    return out


_NUM = lambda t: f"{t:.1f}"  # noqa: E731


def shapes_triplet(event: Any) -> tuple[str, str]:
    """(temporal localisation question, short answer) for a shapes-world event."""
    t, shape = _NUM(event.time), event.shape
    if event.kind == "appear":
        return f"What color is the {shape} that appears at {t} s?", event.color
    if event.kind == "move":
        return f"Where does the {shape} move at {t} s?", event.direction
    if event.kind == "recolor":
        return f"What color does the {shape} turn at {t} s?", event.color
    return f"What color is the {shape} that disappears at {t} s?", event.color


def make_triplets(sample: VideoSample) -> list[tuple[str, str, str]]:
    """(question, step, answer) per keyframe; annotation questions kept, else a generic one."""
    out = []
    for kf in sample.keyframes:
        q = kf.question or f"What happens at {_NUM(kf.time)} s?"
        out.append((q, kf.description.strip(), kf.answer))
    return out


# ----------------------------------------------------------------------------------------------
# 3. consistency filter


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of two (n, d) arrays (0 for a zero vector)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    return (a * b).sum(1) / np.maximum(na * nb, 1e-12)


# Question and function words that carry no content (a short list: scikit-learn's English list
# also drops content words such as "move").
FUNCTION_WORDS = frozenset(
    """a an the at in on of to is are was were be been do does did what which who whom
where when why how that this these those it its and or there here from by with for as after before then
""".split()
)


def content_words(text: str) -> list[str]:
    """Lower-cased words of 2+ letters, `FUNCTION_WORDS` removed, a plural/3rd-person "s" cut
    from words over 3 letters ("moves" -> "move")."""
    out = []
    for w in re.findall(r"[^\W\d_]{2,}", str(text).lower()):
        if w in FUNCTION_WORDS:
            continue
        out.append(w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w)
    return out


class TfidfEncoder:
    """Deterministic offline sentence vectors: scikit-learn TF-IDF (sublinear tf) over
    `content_words`, fitted on a corpus (`fit`) or on the first texts it encodes when not fitted."""

    name = "tfidf"

    def __init__(self, corpus: Iterable[str] | None = None):
        from sklearn.feature_extraction.text import TfidfVectorizer

        self.vec = TfidfVectorizer(sublinear_tf=True, analyzer=content_words)
        self.fitted = False
        if corpus is not None:
            self.fit(corpus)

    def fit(self, corpus: Iterable[str]) -> TfidfEncoder:
        self.vec.fit([str(t) for t in corpus])
        self.fitted = True
        return self

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        texts = [str(t) for t in texts]
        if not self.fitted:
            self.fit(texts)
        return self.vec.transform(texts).toarray()


class HFEncoder:
    """A Hugging Face text encoder by id or local path (e.g. ``BAAI/bge-m3``): CLS pooling,
    L2-normalised. Loading problems raise a one-line `EncoderError`."""

    def __init__(self, name: str, device: str = "cpu", max_length: int = 256, batch_size: int = 32):
        self.name = str(name)
        self.device, self.max_length, self.batch_size = device, int(max_length), int(batch_size)
        try:
            from transformers import AutoModel, AutoTokenizer

            self.tok = AutoTokenizer.from_pretrained(self.name)
            self.model = AutoModel.from_pretrained(self.name).to(device).eval()
        except Exception as e:  # offline hub id, missing folder, unknown architecture, ...
            msg = " ".join(str(e).split())
            raise EncoderError(f"could not load sentence encoder {self.name!r}: {type(e).__name__}: {msg[:200]}") from e

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), self.batch_size):
                enc = self.tok(
                    [str(t) for t in texts[i : i + self.batch_size]],
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                ).to(self.device)
                h = self.model(**enc).last_hidden_state[:, 0].float()
                out.append(torch.nn.functional.normalize(h, dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 1))


def make_encoder(name: str | None = None, corpus: Iterable[str] | None = None):
    """ "tfidf" / None -> `TfidfEncoder` (fitted on `corpus` if given); anything else -> `HFEncoder`."""
    if name in (None, "", "tfidf"):
        return TfidfEncoder(corpus)
    return HFEncoder(name)


def consistency_filter(
    pairs: Sequence[tuple[str, str]], encoder: Any, threshold: float = DEFAULT_THRESHOLD
) -> tuple[list[bool], list[float]]:
    """(keep?, cosine) for each (question, step) pair."""
    if not pairs:
        return [], []
    qs = encoder.encode([q for q, _ in pairs])
    ss = encoder.encode([s for _, s in pairs])
    cos = [float(c) for c in cosine(qs, ss)]
    return [c >= threshold for c in cos], cos


# ----------------------------------------------------------------------------------------------
# validation and the pipeline


def check_sample(sample: VideoSample) -> None:
    """Raise SkipSample when timestamps are unusable."""
    if not sample.keyframes:
        raise SkipSample("no_keyframes", "no keyframes")
    if not (sample.duration > 0 and math.isfinite(sample.duration)):
        raise SkipSample("bad_duration", f"duration {sample.duration!r}")
    last = -math.inf
    for i, kf in enumerate(sample.keyframes):
        vals = (kf.start, kf.end, kf.time)
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in vals):
            raise SkipSample("bad_timestamp", f"keyframe {i}: non-numeric timestamp")
        if kf.start < -EPS or kf.end > sample.duration + EPS or kf.time > sample.duration + EPS:
            raise SkipSample(
                "timestamp_beyond_video",
                f"keyframe {i} [{kf.start}, {kf.end}] @ {kf.time} outside the video (0..{sample.duration:g} s)",
            )
        if not (kf.start <= kf.time + EPS and kf.time <= kf.end + EPS):
            raise SkipSample("bad_interval", f"keyframe {i}: time {kf.time} not in [{kf.start}, {kf.end}]")
        if kf.start < last - EPS:
            raise SkipSample("keyframes_out_of_order", f"keyframe {i} starts at {kf.start} s, before {last} s")
        last = kf.start
        if not kf.description.strip():
            raise SkipSample("missing_field:description", f"keyframe {i} has an empty description")


def build_trajectory(
    sample: VideoSample,
    encoder: Any = None,
    threshold: float = DEFAULT_THRESHOLD,
    fps: float = DEFAULT_FPS,
    group_size: int = 2,
) -> Trajectory:
    """One sample -> its trajectory (raises SkipSample)."""
    check_sample(sample)
    times = resample_times(sample.duration, fps)
    if not times:
        raise SkipSample("empty_video", "no sample time before the end of the video")
    src, kfo = align_frames(times, sample.keyframes, sample.native_times)
    places = place_steps(sample.keyframes, times, src, group_size)
    triplets = make_triplets(sample)
    encoder = encoder if encoder is not None else TfidfEncoder()
    keep, cos = consistency_filter([(q, s) for q, s, _ in triplets], encoder, threshold)
    steps, dropped = [], []
    for i, ((q, s, a), ok, c, pl) in enumerate(zip(triplets, keep, cos, places)):
        if pl is None:
            log.info("%s: keyframe %d has no causal place before the video ends; step dropped", sample.video_id, i)
            continue
        st = Step(q, s, a, i, pl[0], pl[1], c)
        (steps if ok else dropped).append(st)
    for st in dropped:
        log.info(
            "%s: step %r dropped (question/step cosine %.3f < %.3f)",
            sample.video_id,
            st.text,
            st.consistency,
            threshold,
        )
    if not steps:
        raise SkipSample(
            "no_consistent_steps" if dropped else "no_placeable_steps",
            f"no step left ({len(dropped)} below the consistency threshold)",
        )
    return Trajectory(
        sample.video_id,
        sample.question,
        sample.answer,
        float(sample.duration),
        float(fps),
        int(group_size),
        times,
        src,
        kfo,
        steps,
        dropped,
        sample.read_frame,
        sample.events,
    )


def build_trajectories(
    samples: Iterable[VideoSample | SkipSample],
    encoder: Any = None,
    threshold: float = DEFAULT_THRESHOLD,
    fps: float = DEFAULT_FPS,
    group_size: int = 2,
) -> tuple[list[Trajectory], Counter]:
    """Trajectories of the usable samples and a Counter of skip reasons (the run never stops on
    a bad sample). Items may be SkipSample markers from a loader (counted as they are). A
    TF-IDF encoder that is not fitted yet is fitted on every question and step of the samples."""
    samples = list(samples)
    skipped: Counter = Counter()
    good = [s for s in samples if isinstance(s, VideoSample)]
    if encoder is None:
        encoder = TfidfEncoder()
    if isinstance(encoder, TfidfEncoder) and not encoder.fitted:
        corpus = [t for s in good for q, st, _ in make_triplets(s) for t in (q, st)]
        encoder.fit(corpus or ["empty"])
    out = []
    for s in samples:
        if isinstance(s, SkipSample):
            skipped[s.reason] += 1
            continue
        try:
            out.append(build_trajectory(s, encoder, threshold, fps, group_size))
        except SkipSample as e:
            skipped[e.reason] += 1
            log.warning("skipping %s: %s (%s)", s.video_id, e.reason, e)
    return out, skipped


# ----------------------------------------------------------------------------------------------
# sources: shapes-world streams


def shapes_sample(stream: Stream) -> VideoSample:
    """A `vstream.world.shapes_video.Stream` as an annotated video. Keyframes are its events: interval =
    the event's keyframe interval; timestamp = the event time (the state changes then), except
    for a move, whose keyframe is the half-way frame (the direction shows; the move lasts the
    whole interval). Frames are rendered at any time (no native frame grid)."""
    kfs = []
    for e in stream.events:
        t = e.time + (e.interval[1] - e.interval[0]) / 2 if e.kind == "move" else e.time
        q, a = shapes_triplet(e)
        kfs.append(Keyframe(float(e.interval[0]), float(e.interval[1]), round(float(t), 3), e.step, q, a))
    events = ShapesSource(stream, fps=DEFAULT_FPS, realtime=False).events
    return VideoSample(
        f"shapes-{stream.seed}",
        stream.question,
        stream.answer,
        float(stream.duration),
        kfs,
        stream.frame_at,
        None,
        events,
        {"seed": stream.seed, "kind": stream.kind},
    )


def shapes_samples(split: str, start: int, n: int, duration: float | None = None) -> list[VideoSample]:
    return [shapes_sample(s) for s in streams(split, start, n, duration)]


_SHAPES_ENCODER: TfidfEncoder | None = None


def shapes_encoder() -> TfidfEncoder:
    """A TF-IDF encoder fitted once on the triplets of 300 training streams (deterministic)."""
    global _SHAPES_ENCODER
    if _SHAPES_ENCODER is None:
        corpus = [t for s in shapes_samples("train", 0, 300) for q, st, _ in make_triplets(s) for t in (q, st)]
        _SHAPES_ENCODER = TfidfEncoder(corpus)
    return _SHAPES_ENCODER


# ----------------------------------------------------------------------------------------------
# sources: VideoEspresso-style annotation files


class VideoFrames:
    """Native frames of a video file with their timestamps (decord, PyAV fallback). Opening
    checks the file (a `tays.sources.StreamError` for missing / empty / corrupt / undecodable)."""

    def __init__(self, path: str | Path):
        src = VideoFileSource(path, realtime=False)
        self.duration = float(src.duration) if src.duration is not None else None
        self.times, self._get = src.native_frames()
        if self.duration is None and self.times:
            self.duration = self.times[-1] + 1.0 / max(src.native_fps, 1e-6)
        self._index = {round(t, 6): i for i, t in enumerate(self.times)}

    def read(self, t: float) -> Image.Image:
        i = self._index.get(round(float(t), 6))
        if i is None:  # a keyframe timestamp between native frames: the frame shown then
            i = max(0, int(np.searchsorted(np.asarray(self.times), float(t) + 1e-9, side="right")) - 1)
        return Image.fromarray(np.asarray(self._get(i))).convert("RGB")


def _num(d: dict, *keys: str) -> Any:
    for k in keys:
        if k in d and d[k] is not None:
            return d[k]
    return None


def _parse_item(item: Any, base: Path, i: int) -> VideoSample:
    if not isinstance(item, dict):
        raise SkipSample("bad_item", f"item {i} is not an object")
    vid = str(item.get("video_id") or item.get("id") or (Path(str(item.get("video_path", ""))).stem or f"item-{i}"))
    for name in ("video_path", "question"):
        if not item.get(name):
            raise SkipSample(f"missing_field:{name}", f"{vid}: no {name!r}")
    answer = item.get("answer", item.get("correct_answer"))
    if answer is None or answer == "":
        raise SkipSample("missing_field:answer", f"{vid}: no 'answer' / 'correct_answer'")
    raw_kfs = item.get("keyframes", item.get("key_frames"))
    if raw_kfs is None:
        raise SkipSample("missing_field:keyframes", f"{vid}: no 'keyframes'")
    kfs = []
    for j, k in enumerate(raw_kfs):
        if not isinstance(k, dict):
            raise SkipSample("bad_keyframe", f"{vid}: keyframe {j} is not an object")
        start, end = _num(k, "start"), _num(k, "end")
        if (start is None or end is None) and isinstance(k.get("interval"), (list, tuple)) and len(k["interval"]) == 2:
            start, end = k["interval"]
        t = _num(k, "time", "timestamp")
        desc = _num(k, "description", "caption", "step")
        if start is None or end is None:
            if t is None:
                raise SkipSample("missing_field:keyframe_time", f"{vid}: keyframe {j} has no interval or timestamp")
            start = end = t
        if desc is None:
            raise SkipSample("missing_field:description", f"{vid}: keyframe {j} has no description")
        t = start if t is None else t
        try:
            start, end, t = float(start), float(end), float(t)
        except (TypeError, ValueError):
            raise SkipSample("bad_timestamp", f"{vid}: keyframe {j} has a non-numeric timestamp") from None
        kfs.append(Keyframe(start, end, t, str(desc), str(k.get("question") or ""), str(k.get("answer") or "")))
    path = Path(str(item["video_path"]))
    path = path if path.is_absolute() else base / path
    try:
        video = VideoFrames(path)
    except Exception as e:
        raise SkipSample("unreadable_video", f"{vid}: {' '.join(str(e).split())}") from e
    dur = item.get("duration")
    duration = float(dur) if isinstance(dur, (int, float)) and dur > 0 else video.duration
    if video.duration is not None and duration > video.duration + 0.5:
        raise SkipSample(
            "timestamp_beyond_video", f"{vid}: annotated duration {duration} s > video {video.duration:.2f} s"
        )
    meta = {k: item[k] for k in ("task", "evidence", "options") if k in item}
    meta["video_path"] = str(path)
    return VideoSample(
        vid, str(item["question"]), str(answer), float(duration), kfs, video.read, video.times, None, meta
    )


def load_videoespresso(path: str | Path) -> tuple[list[VideoSample], Counter]:
    """Parse an annotation JSON (a list of items, or {"data": [...]}); returns the usable samples
    and a Counter of skip reasons (the run goes on past bad items). Videos are opened (checked)
    here; frames are read on demand."""
    path = Path(path)
    skipped: Counter = Counter()
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        log.warning("cannot read annotation file %s: %s", path, e)
        skipped["unreadable_annotations"] += 1
        return [], skipped
    items = data.get("data", data.get("annotations")) if isinstance(data, dict) else data
    if not isinstance(items, list):
        skipped["unreadable_annotations"] += 1
        return [], skipped
    out = []
    for i, item in enumerate(items):
        try:
            out.append(_parse_item(item, path.parent, i))
        except SkipSample as e:
            skipped[e.reason] += 1
            log.warning("skipping item %d of %s: %s (%s)", i, path.name, e.reason, e)
    return out, skipped


# ----------------------------------------------------------------------------------------------
# the data set (python -m tays data)


def trajectory_record(t: Trajectory) -> dict[str, Any]:
    """A JSON-able summary of a trajectory (no pixels)."""
    return {
        "video_id": t.video_id,
        "question": t.question,
        "answer": t.answer,
        "duration": t.duration,
        "fps": t.fps,
        "group_size": t.group_size,
        "sample_times": t.sample_times,
        "source_times": t.source_times,
        "keyframe_of": t.keyframe_of,
        "steps": [
            {
                "question": s.question,
                "text": s.text,
                "answer": s.answer,
                "keyframe": s.keyframe,
                "group": s.group,
                "time": s.time,
                "consistency": round(s.consistency, 4),
            }
            for s in t.steps
        ],
        "dropped": [
            {"question": s.question, "text": s.text, "consistency": round(s.consistency, 4)} for s in t.dropped
        ],
    }


def build_dataset(
    encoder: Any,
    annotations: Path | None = None,
    shapes: int = 100,
    start: int = 0,
    threshold: float = DEFAULT_THRESHOLD,
    fps: float = DEFAULT_FPS,
    out: Path | None = None,
) -> dict[str, Any]:
    """Trajectories from a VideoEspresso-style annotation file, else from `shapes` training-split
    shapes-world streams from index `start` (a TF-IDF encoder is then fitted on the shapes-world
    texts); written as JSON lines to `out` if given. Returns the counts of what was kept and
    skipped."""
    if annotations is not None:
        samples, skipped = load_videoespresso(annotations)
    else:
        samples, skipped = shapes_samples("train", start, shapes), Counter()
        if isinstance(encoder, TfidfEncoder):
            encoder = shapes_encoder()
    trajs, more = build_trajectories(samples, encoder, threshold, fps)
    skipped.update(more)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w") as f:
            for t in trajs:
                f.write(json.dumps(trajectory_record(t)) + "\n")
    return {
        "trajectories": len(trajs),
        "skipped": dict(skipped),
        "skipped_total": sum(skipped.values()),
        "steps": sum(len(t.steps) for t in trajs),
        "dropped_steps": sum(len(t.dropped) for t in trajs),
        "encoder": getattr(encoder, "name", "tfidf"),
        "threshold": threshold,
    }
