"""Non-UI logic behind the explorer (app.py): input checks, model and estimator choice, the
per-run record that the Reasoning, Annotation and Video tabs read. No Gradio here, so every
rule the page enforces can be tested without a browser.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from PIL import Image

from tays import prewarm
from ui import figures
from vstream.attr.estimator import Estimator, LinearEstimator, RawAttention
from vstream.attr.estimator import load as load_estimator
from vstream.attr.regions import Regions
from vstream.attr.spans import SpanSplitter
from vstream.attr.worker import DoneEvent, Event, PathEvent, RegionsEvent, SpanEvent
from vstream.model import VLM, VLMError, load_vlm, normalize_image_with_size
from vstream.world.assets import DEMO_ESTIMATOR, DEMO_MODEL_DIR, EXAMPLES_DIR, TAYS_MODEL_DIR

MAX_QUESTION_CHARS = 2000
ImageInput = str | Path | Image.Image | np.ndarray  # what an image field or an API client sends
N = TypeVar("N", int, float)
_load_lock = threading.Lock()


# ----------------------------------------------------------------------------------------------
# inputs


def check_question(question: Any, limit: int = MAX_QUESTION_CHARS) -> str:
    """The stripped question, or a one-line VLMError saying what is wrong with it."""
    q = str(question or "").strip()
    if not q:
        raise VLMError("Type a question about the image.")
    if len(q) > limit:
        raise VLMError(f"The question is {len(q)} characters long; the limit is {limit}.")
    return q


def load_image(image: ImageInput | None) -> Image.Image:
    """A user's image (path, PIL, array) as given, after the adapter's checks; a corrupt file,
    a missing image or an absurd size gives a one-line VLMError."""
    if image is None or (isinstance(image, str) and not image.strip()):
        raise VLMError("Pick an example or upload an image first.")
    pil, _ = normalize_image_with_size(image)
    return pil


def check_fps(fps: Any) -> float:
    """The Video tab's frame rate as a float in [0.25, 8]; an API client may send anything."""
    try:
        f = float(fps)
    except (TypeError, ValueError):
        raise VLMError(f"FPS must be a number, got {fps!r}") from None
    if not 0.25 <= f <= 8:
        raise VLMError(f"FPS must be between 0.25 and 8, got {f:g}")
    return f


def as_number(value: Any, kind: type[N]) -> N:
    """int(value) or float(value) of a number field; a cleared field (None) or junk from an API
    client becomes a one-line VLMError carrying Python's own message."""
    try:
        return kind(value)
    except (TypeError, ValueError) as e:
        raise VLMError(str(e)) from None


@lru_cache(maxsize=1)
def _example_hashes() -> dict[str, str]:
    """sha1 of every example image -> 'examples/<name>' (uploads arrive as copies in a cache)."""
    out = {}
    for path in sorted(EXAMPLES_DIR.glob("*.png")) + [Path(p) for p, _ in photo_examples()]:
        try:
            out[hashlib.sha1(path.read_bytes()).hexdigest()[:16]] = f"examples/{path.name}"
        except OSError:
            pass
    return out


def image_ref(image: ImageInput) -> str:
    """A stable reference for an annotated image: 'examples/<name>' for a shipped example
    (recognised by content, wherever the copy lives), else 'sha1:<first 16 hex>' of the file."""
    if isinstance(image, (str, Path)):
        try:
            digest = hashlib.sha1(Path(image).read_bytes()).hexdigest()[:16]
        except OSError:
            return Path(image).name
    elif isinstance(image, Image.Image):
        digest = hashlib.sha1(image.tobytes()).hexdigest()[:16]
    else:
        return ""
    return _example_hashes().get(digest, f"sha1:{digest}")


# ----------------------------------------------------------------------------------------------
# models and estimators


def model_key(name: str | None) -> str:
    """Empty means the demo model, so both spellings share one loaded copy and one lab state."""
    return str(name or "").strip() or str(DEMO_MODEL_DIR)


def default_video_model() -> str:
    """The shipped TaYS checkpoint when present, else the image demo model."""
    return str(TAYS_MODEL_DIR) if (TAYS_MODEL_DIR / "config.json").is_file() else str(DEMO_MODEL_DIR)


@lru_cache(maxsize=2)
def _model(name: str) -> VLM:
    return load_vlm(name)


def get_model(name: str | None) -> VLM:
    """Load (once, shared by all sessions: weights are read-only, generation takes `vlm.lock`)."""
    with _load_lock:  # two first requests must not load the same model twice
        return _model(model_key(name))


def warm_up(name: str | None, video: str | None = None) -> None:
    """Load the default model and the video model (`video`, default: the same) and, on CPU,
    start the TaYS frame-ingestion process with the video model, so the first user does not
    wait for either (the ingestion server's imports take seconds). Failures are only logged:
    the first real request reports them properly."""
    try:
        vlm = get_model(name)
        if video is not None and model_key(video) != model_key(name):
            vlm = get_model(video)
        if vlm.device.type == "cpu":
            prewarm(vlm)
    except Exception as e:  # noqa: BLE001 - a warm-up must never take the server down
        print(f"warm-up skipped: {type(e).__name__}: {e}", file=sys.stderr)


@lru_cache(maxsize=4)
def _shipped(path: str, model: str) -> LinearEstimator:
    return load_estimator(path, get_model(model))


def estimator_for(
    vlm: VLM, model: str | None, session_estimator: LinearEstimator | None = None
) -> tuple[Estimator, str]:
    """The estimator a run uses and a note saying which: the session's own (Estimator lab)
    when it fits the model, else the shipped one when it fits, else raw attention."""
    if session_estimator is not None:
        try:
            session_estimator.check_compatible(vlm, where="the lab's estimator")
            return session_estimator, "estimator: trained or loaded in the Estimator lab"
        except VLMError as e:
            note = f"{e}; "
    else:
        note = ""
    try:
        return _shipped(str(DEMO_ESTIMATOR), model_key(model)), note + "estimator: shipped demo estimator"
    except VLMError:
        return RawAttention(), note + "no trained estimator fits this model: scores are raw attention"


# ----------------------------------------------------------------------------------------------
# one attributed run, as the tabs read it


@dataclass
class SpanRecord:
    index: int
    kind: str
    text: str
    scores: np.ndarray
    heatmap: np.ndarray
    top_regions: list[int]
    latency_ms: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "kind": self.kind,
            "text": self.text,
            "scores": [round(float(s), 6) for s in self.scores],
            "top_regions": list(self.top_regions),
            "latency_ms": round(float(self.latency_ms), 2),
        }


@dataclass
class RunRecord:
    """What a finished (or running) attribution run leaves behind for the other tabs."""

    run_id: str
    model: str
    question: str
    image: Image.Image
    image_ref: str
    regions: Regions | None = None
    pixel_labels: np.ndarray | None = None
    outlines: np.ndarray | None = None
    centres: np.ndarray | None = None
    spans: list[SpanRecord] = field(default_factory=list)
    text: str = ""
    answer: str = ""
    label: str = "stable"
    path: np.ndarray | None = None
    path_length: float = 0.0
    tortuosity: float | None = None
    done: bool = False
    cancelled: bool = False
    error: str | None = None
    estimator_note: str = ""
    out_dir: Path | None = None  # where overlay PNGs are written once each (the gallery serves files)
    _files: dict[int, str] = field(default_factory=dict)

    def apply(self, ev: Event) -> None:
        """Fold one attribution event into the record (token text is `LiveText`'s)."""
        if isinstance(ev, RegionsEvent):
            self.set_regions(ev.regions, ev.image_size)
        elif isinstance(ev, SpanEvent):
            self.spans.append(
                SpanRecord(
                    ev.span.index,
                    ev.span.kind,
                    ev.span.text,
                    ev.scores,
                    ev.heatmap,
                    list(ev.top_regions),
                    ev.latency_ms,
                )
            )
        elif isinstance(ev, PathEvent):
            p = ev.point
            self.path, self.path_length, self.tortuosity, self.label = p.path, p.path_length, p.tortuosity, p.label
        elif isinstance(ev, DoneEvent):
            self.text, self.answer, self.label = ev.text, ev.answer, ev.label
            self.cancelled, self.error, self.done = ev.cancelled, ev.error, True

    def set_regions(self, regions: Regions, image_size: tuple[int, int]) -> None:
        self.regions = regions
        self.pixel_labels = regions.pixel_labels(image_size)
        self.outlines = regions.outlines(image_size)
        self.centres = figures.region_centres(self.pixel_labels, regions.k)

    def region_at(self, point: tuple[float, float]) -> int | None:
        """Region id under an (x, y) point in [0, 1] of the image."""
        if self.pixel_labels is None:
            return None
        h, w = self.pixel_labels.shape
        x = min(w - 1, max(0, int(point[0] * w)))
        y = min(h - 1, max(0, int(point[1] * h)))
        return int(self.pixel_labels[y, x])

    def overlay(self, i: int, point: tuple[float, float] | None = None) -> Image.Image:
        s = self.spans[i]
        return figures.overlay(self.image, s.heatmap, self.outlines, s.top_regions, self.centres, point=point)

    def overlay_file(self, i: int) -> str:
        """Span i's overlay as a PNG file, written once (re-sending a file costs nothing, while a
        PIL image would be re-encoded and rewritten into Gradio's cache on every update)."""
        if i not in self._files:
            if self.out_dir is None:
                self.out_dir = Path(tempfile.mkdtemp(prefix=f"vstream-run-{self.run_id}-"))
            path = self.out_dir / f"span{i:03d}.png"
            self.overlay(i).save(path)
            self._files[i] = str(path)
        return self._files[i]

    def gallery(self) -> list[tuple[str, str]]:
        """The heatmap gallery: one captioned overlay per closed span."""
        items = []
        for i, s in enumerate(self.spans):
            top = ", ".join(str(r) for r in s.top_regions[:3])
            items.append((self.overlay_file(i), f"span {i} [{s.kind}] {s.text[:80]} | top regions {top}"))
        return items

    def point_at(self, x: float, y: float) -> tuple[float, float]:
        """An annotator's click in overlay pixels as (x, y) in [0, 1]. The overlay is drawn at the
        image's original size, which is the heatmaps' size."""
        h, w = self.pixel_labels.shape if self.pixel_labels is not None else (self.image.height, self.image.width)
        return min(1.0, max(0.0, x / w)), min(1.0, max(0.0, y / h))

    def cleanup(self) -> None:
        if self.out_dir is not None:
            shutil.rmtree(self.out_dir, ignore_errors=True)

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "model": self.model,
            "question": self.question,
            "image_ref": self.image_ref,
            "k": None if self.regions is None else int(self.regions.k),
            "spans": [s.to_dict() for s in self.spans],
            "text": self.text,
            "answer": self.answer,
            "label": self.label,
            "path_length": round(float(self.path_length), 6),
            "tortuosity": None if self.tortuosity is None else round(float(self.tortuosity), 6),
            "done": self.done,
            "cancelled": self.cancelled,
            "error": self.error,
            "estimator": self.estimator_note,
        }


class LiveText:
    """The reasoning text while it streams. The page splits it itself so that a span is marked
    as closed the moment its end arrives, before the worker has scored it."""

    def __init__(self) -> None:
        self.pieces: list[str] = []
        self.closed_upto = 0  # pieces[:closed_upto] belong to closed spans
        self._splitter = SpanSplitter()

    @property
    def n_tokens(self) -> int:
        return len(self.pieces)

    def add(self, index: int, piece: str) -> None:
        self.pieces.append(piece)
        for sp in self._splitter.push(index, piece):
            self.closed_upto = max(self.closed_upto, sp.token_end)

    def segments(self, done: bool = False) -> list[tuple[str, str | None]]:
        """HighlightedText value: closed spans plain, the span being written marked 'current'."""
        upto = len(self.pieces) if done else self.closed_upto
        closed = "".join(self.pieces[:upto])
        current = "".join(self.pieces[upto:])
        out: list[tuple[str, str | None]] = []
        if closed:
            out.append((closed, None))
        if current:
            out.append((current, None if done else "current"))
        return out


# ----------------------------------------------------------------------------------------------
# examples


PHOTO_QUESTIONS = {"china.jpg": "What is in the picture?", "flower.jpg": "What color is the flower?"}


def photo_examples(dest: Path | None = None) -> list[list[str]]:
    """Real photos that ship with scikit-learn (china.jpg, flower.jpg; Creative Commons, see
    sklearn/datasets/images/README.txt), copied to a temp folder the web server may serve."""
    try:
        import sklearn.datasets as ds
    except Exception:
        return []
    src = Path(ds.__file__).resolve().parent / "images"
    dest = dest or Path(tempfile.gettempdir()) / "vstream-photos"
    out = []
    for name, q in PHOTO_QUESTIONS.items():
        if not (src / name).is_file():
            continue
        try:
            dest.mkdir(parents=True, exist_ok=True)
            if not (dest / name).is_file():
                shutil.copyfile(src / name, dest / name)
        except OSError:
            continue
        out.append([str(dest / name), q])
    return out
