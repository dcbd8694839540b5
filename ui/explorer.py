"""Non-UI logic behind the explorer (app.py): input checks, model and estimator choice, the
per-run record that the Reasoning, Annotation and Video tabs read. No Gradio here, so every
rule the page enforces can be tested without a browser.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
import threading
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from PIL import Image

from tays import prewarm, regions_proc
from ui import figures
from ui.access import ModelPolicy, not_available
from vstream.attr.estimator import Estimator, LinearEstimator, RawAttention
from vstream.attr.estimator import load as load_estimator
from vstream.attr.estimator_lookup import find_estimator
from vstream.attr.record import RunRecord, load_run
from vstream.attr.risk import RiskModel
from vstream.attr.spans import SpanSplitter
from vstream.attr.worker import Event, RegionsEvent
from vstream.model import VLM, VLMError, load_vlm, normalize_image_with_size
from vstream.world.assets import DEMO_ESTIMATOR, DEMO_MODEL_DIR, EXAMPLES_DIR, RISK_MODEL, TAYS_MODEL_DIR
from vstream.world.examples import answer_verdict, example_truth

MAX_QUESTION_CHARS = 2000
MIN_DRAW_SIDE = 448  # pictures of smaller images are drawn enlarged (see RunView.refresh_regions)
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
    except (TypeError, ValueError, OverflowError) as e:  # OverflowError: int(inf)
        raise VLMError(str(e)) from None


@lru_cache(maxsize=1)
def _example_hashes() -> dict[str, str]:
    """sha1 of every example image -> 'examples/<name>' (uploads arrive as copies in a cache)."""
    out = {}
    for path in sorted(EXAMPLES_DIR.glob("*.png")) + [Path(row[0]) for row in photo_examples()]:
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


POLICY = ModelPolicy.of([str(DEMO_MODEL_DIR)])  # replaced by `configure_models` when the page is built


def configure_models(policy: ModelPolicy) -> None:
    """The server's model list (`--models`, `--allow-any-model`); every load goes through it."""
    global POLICY
    POLICY = policy


def shipped_models() -> list[str]:
    """The models that ship with the repository: the demo model and, if present, the TaYS one."""
    return [str(DEMO_MODEL_DIR)] + ([str(TAYS_MODEL_DIR)] if (TAYS_MODEL_DIR / "config.json").is_file() else [])


def model_key(name: str | None) -> str:
    """The model a visitor's choice names: empty means the default, so both spellings share one
    loaded copy and one lab state; a name outside the server's list is refused here, before any
    disk or network access (`ui.access.ModelPolicy`)."""
    return POLICY.resolve(name)


def model_label(name: str | None) -> str:
    """The public name of a visitor's model choice (what menus show and runs record)."""
    return POLICY.label(model_key(name))


def default_video_model() -> str:
    """The shipped TaYS checkpoint when present, else the image demo model."""
    return str(TAYS_MODEL_DIR) if (TAYS_MODEL_DIR / "config.json").is_file() else str(DEMO_MODEL_DIR)


MAX_LOADED = 2  # models kept in memory at once (the oldest loaded is dropped first)
_loaded: dict[str, VLM] = {}
_loading: dict[str, threading.Lock] = {}


def is_loaded(name: str | None) -> bool:
    """Whether `name` is in memory already (a first use loads it: say so in the page first)."""
    return model_key(name) in _loaded


def get_model(name: str | None) -> VLM:
    """Load (once, shared by all sessions: weights are read-only, generation takes `vlm.lock`).
    Each model loads under its own lock, so a large model loading for one visitor never holds up
    sessions that use a model already in memory. A name the operator did not list (only
    possible with `--allow-any-model`) that fails to load, for whatever reason, gives the same
    one message as a forbidden one: the page never tells a visitor whether a path exists."""
    key = model_key(name)
    vlm = _loaded.get(key)
    if vlm is not None:
        return vlm
    with _load_lock:
        lock = _loading.setdefault(key, threading.Lock())
    with lock:  # two first requests for one model must not load it twice
        if key in _loaded:
            return _loaded[key]
        try:
            vlm = load_vlm(key)
        except Exception:
            if POLICY.is_listed(key):
                raise
            raise VLMError(not_available(key)) from None
        with _load_lock:
            while len(_loaded) >= MAX_LOADED:
                _loaded.pop(next(iter(_loaded)))
            _loaded[key] = vlm
        return vlm


def forget_models() -> None:
    """Drop every loaded model (tests; the next use loads again)."""
    with _load_lock:
        _loaded.clear()


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
        regions_proc.prewarm()  # the Video tab's frame clustering, off this interpreter
    except Exception as e:  # noqa: BLE001 - a warm-up must never take the server down
        print(f"warm-up skipped: {type(e).__name__}: {e}", file=sys.stderr)


@lru_cache(maxsize=4)
def _shipped(path: str, model: str) -> LinearEstimator:
    return load_estimator(path, get_model(model))


def risk_for(model: str | None) -> RiskModel | None:
    """The shipped failure-risk model, for the shipped demo model only (it was fitted on that
    model's traces); None when it is absent or unreadable, and the page then shows no risk."""
    if model_key(model) != model_key(str(DEMO_MODEL_DIR)) or not RISK_MODEL.is_file():
        return None
    return _risk(str(RISK_MODEL))


@lru_cache(maxsize=1)
def _risk(path: str) -> RiskModel | None:
    try:
        return RiskModel.load(Path(path))
    except VLMError as e:
        print(f"risk model skipped: {e}", file=sys.stderr)
        return None


def example_verdict(image: Image.Image, question: str, answer: str) -> str:
    """'✓ right / ✗ wrong: ground truth ...' when the run was on a gallery example, else ''."""
    truth = example_truth(image, question)
    return "" if truth is None else answer_verdict(truth, answer)


# estimators for other models than the demo (python -m vstream train-estimator --out DIR/NAME.safetensors)
ESTIMATORS_DIR = Path(os.environ.get("VSTREAM_ESTIMATORS", "estimators"))


def estimator_for(
    vlm: VLM, model: str | None, session_estimator: LinearEstimator | None = None
) -> tuple[Estimator, str]:
    """The estimator a run uses and a note saying which: the session's own (Estimator lab)
    when it fits the model, else the shipped one when it fits, else the one trained for this model
    in ESTIMATORS_DIR, else raw attention with a note giving the commands that train one."""
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
        pass
    found = find_estimator(vlm, ESTIMATORS_DIR, model)  # the one trained for this model, if any
    if found.estimator is not None:
        return found.estimator, note + found.note
    return RawAttention(), note + found.note + "; until then scores are raw attention"


# ----------------------------------------------------------------------------------------------
# one attributed run, as the tabs read it


class RunView:
    """A run (`vstream.attr.record.RunRecord`) as the page shows it: its region maps at drawing
    size, overlay files written once per span and scale, the click-to-region mapping.
    `shared`: one colour scale for all spans (default) or each span's own range."""

    def __init__(self, record: RunRecord, note: str = "", opened: bool = False) -> None:
        self.record = record
        self.note = note  # which estimator, shown in the status line
        self.opened = opened  # reopened from a file (not run in this session)
        self.pixel_labels: np.ndarray | None = None
        self.outlines: np.ndarray | None = None
        self.centres: np.ndarray | None = None
        self.out_dir: Path | None = None  # overlay PNGs (the gallery serves files)
        self._files: dict[tuple[int, str, bool], str] = {}
        self.size: tuple[int, int] = (0, 0)  # (w, h) the pictures are drawn at
        self._base: Image.Image | None = None
        if record.regions is not None:
            self.refresh_regions()

    def __getattr__(self, name: str) -> Any:  # run_id, spans, model, ... read through to the record
        if name == "record":
            raise AttributeError(name)
        return getattr(self.record, name)

    def apply(self, ev: Event) -> None:
        self.record.apply(ev)
        if isinstance(ev, RegionsEvent):
            self.refresh_regions()

    def refresh_regions(self) -> None:
        """Region maps at the drawing size: the image's own, enlarged by a whole factor (up to 4)
        while its long side is under MIN_DRAW_SIDE, so small images get readable outlines and
        rank labels."""
        rec = self.record
        w, h = rec.image_size if rec.image_size and rec.image_size[0] else rec.image.size
        f = max(1, min(4, MIN_DRAW_SIDE // max(w, h)))
        self.size = (w * f, h * f)
        self.pixel_labels = rec.regions.pixel_labels(self.size)
        self.outlines = rec.regions.outlines(self.size)
        self.centres = figures.region_centres(self.pixel_labels, rec.k)
        self._base = rec.image.convert("RGB").resize(self.size, Image.Resampling.LANCZOS)

    def dynamics(self, final: bool = False, risk_auc: dict[str, Any] | None = None) -> str:
        """The path-shape readout, with the latest failure risk when a risk model ran."""
        rec = self.record
        risk = rec.risk[-1] if rec.risk else None
        return figures.dynamics_markdown(
            rec.path_length, rec.tortuosity, rec.label, len(rec.spans), final=final, risk=risk, risk_auc=risk_auc
        )

    def title(self) -> str:
        """How the run is named in menus: id, question, and whether it was reopened."""
        q = self.record.question
        return f"{self.record.run_id} · {q[:50]}{'…' if len(q) > 50 else ''}" + (" (file)" if self.opened else "")

    def scale(self, i: int, shared: bool = True, method: str | None = None) -> tuple[float, float]:
        rec = self.record
        m = method or rec.method
        if shared:
            scores = [rec.span_scores(j, m) for j, s in enumerate(rec.spans) if m in s.methods]
            return figures.span_scale(scores or [rec.span_scores(i, m)], 0, shared=True)
        return figures.span_scale([rec.span_scores(i, m)], 0, shared=False)

    def region_at(self, point: tuple[float, float]) -> int | None:
        """Region id under an (x, y) point in [0, 1] of the image."""
        if self.pixel_labels is None:
            return None
        h, w = self.pixel_labels.shape
        x = min(w - 1, max(0, int(point[0] * w)))
        y = min(h - 1, max(0, int(point[1] * h)))
        return int(self.pixel_labels[y, x])

    def overlay(
        self, i: int, point: tuple[float, float] | None = None, shared: bool = True, method: str | None = None
    ) -> Image.Image:
        rec = self.record
        scores = rec.span_scores(i, method)
        top = rec.spans[i].top_regions if method in (None, rec.method) else _top(scores)
        return figures.overlay(
            self._base if self._base is not None else rec.image,
            scores[self.pixel_labels],
            self.outlines,
            top[:3],
            self.centres,
            point=point,
            scale=self.scale(i, shared, method),
        )

    def overlay_file(self, i: int, shared: bool = True, method: str | None = None, colorbar: bool = False) -> str:
        """Span i's overlay as a PNG file, written once per (span, method, scale); re-sending a
        file costs nothing, while a PIL image would be re-encoded into Gradio's cache each time.
        A shared scale changes as spans arrive, so those files are keyed by the span count too."""
        m = method or self.record.method
        key = (i, f"{m}{'+bar' if colorbar else ''}{len(self.record.spans) if shared else ''}", shared)
        if key not in self._files:
            if self.out_dir is None:
                self.out_dir = Path(tempfile.mkdtemp(prefix=f"vstream-run-{self.record.run_id}-"))
            path = self.out_dir / f"span{i:03d}-{m}-{'shared' if shared else 'own'}-{len(self._files)}.png"
            img = self.overlay(i, shared=shared, method=m)
            if colorbar:
                img = figures.with_colorbar(img, self.scale(i, shared, m))
            img.save(path)
            self._files[key] = str(path)
        return self._files[key]

    def gallery(self, shared: bool = True) -> list[tuple[str, str]]:
        """The heatmap gallery: one captioned overlay per closed span."""
        items = []
        for i, s in enumerate(self.record.spans):
            top = ", ".join(str(r) for r in s.top_regions[:3])
            items.append((self.overlay_file(i, shared), f"span {i} [{s.kind}] {s.text[:80]} | top regions {top}"))
        return items

    def span_figure(self, i: int, shared: bool = True) -> Any:
        """The large, hoverable view of span i (plotly)."""
        rec = self.record
        s = rec.spans[i]
        scale = self.scale(i, shared)
        title = f"span {i} [{s.kind}]: {s.text[:90]}  ·  {'shared' if shared else 'per-span'} scale"
        return figures.span_figure(
            rec.image,
            self.pixel_labels,
            rec.span_scores(i),
            scale,
            self.outlines,
            s.top_regions[:3],
            self.centres,
            title,
        )

    def point_at(self, x: float, y: float) -> tuple[float, float]:
        """An annotator's click in overlay pixels as (x, y) in [0, 1] (the overlay is drawn at
        `size`, the size of `pixel_labels`)."""
        img = self.record.image
        h, w = self.pixel_labels.shape if self.pixel_labels is not None else (img.height, img.width)
        return min(1.0, max(0.0, x / w)), min(1.0, max(0.0, y / h))

    def cleanup(self) -> None:
        if self.out_dir is not None:
            shutil.rmtree(self.out_dir, ignore_errors=True)
            self.out_dir, self._files = None, {}

    def live_dict(self) -> dict[str, Any]:
        """What the page's JSON shows while a run streams: the record without the image and maps
        (the finished run's JSON is the full `to_dict`, the same as a saved file)."""
        d = self.record.to_dict()
        d.pop("image", None)
        d.pop("regions", None)
        return d


def open_run_file(path: str) -> RunRecord:
    """A visitor's uploaded run file, checked (size first, then every field); one-line
    RunFileError if it is not a run."""
    if not str(path).lower().endswith(".json"):
        raise VLMError("A saved run is a .json file (from Save run).")
    return load_run(path)


def _top(scores: np.ndarray, n: int = 5) -> list[int]:
    return [int(r) for r in np.argsort(-np.asarray(scores), kind="stable")[:n]]


def spans_segments(view: RunView, selected: int | None) -> tuple[list[tuple[str, str | None]], list[int | None]]:
    """A finished run's text as HighlightedText segments, one per span (so a click on a sentence
    names its span), the selected span marked; and each segment's span index (None between)."""
    rec = view.record
    pieces = rec.tokens
    segs: list[tuple[str, str | None]] = []
    owner: list[int | None] = []
    pos = 0
    for i, s in enumerate(rec.spans):
        if not pieces:
            break
        if s.token_start > pos:
            segs.append(("".join(pieces[pos : s.token_start]), None))
            owner.append(None)
        segs.append(("".join(pieces[s.token_start : s.token_end]), "selected span" if i == selected else "span"))
        owner.append(i)
        pos = max(pos, s.token_end)
    if not pieces:  # a run without token pieces: one segment per span text
        for i, s in enumerate(rec.spans):
            segs.append((s.text + " ", "selected span" if i == selected else "span"))
            owner.append(i)
    elif pos < len(pieces):
        segs.append(("".join(pieces[pos:]), None))
        owner.append(None)
    return segs, owner


def compare_rows(view: RunView, i: int) -> list[list[Any]]:
    """Rows [method, time (ms), top 3 regions, rank agreement with the run's method] for span i."""
    rec = view.record
    s = rec.spans[i]
    base = rec.span_scores(i)
    rows = []
    for m in ("vstream", "raw_attention", "occlusion"):
        if m not in s.methods:
            continue
        sc = np.asarray(s.methods[m]["scores"], dtype=np.float64)
        rows.append([m, round(float(s.methods[m]["ms"]), 3), ", ".join(map(str, _top(sc, 3))), _spearman(base, sc)])
    return rows


def _spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.size < 2 or a.std() == 0 or b.std() == 0:
        return None
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return round(float(np.corrcoef(ra, rb)[0, 1]), 3)


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
    """[[path, question, truth], ...]: real photos that ship with scikit-learn (china.jpg,
    flower.jpg; Creative Commons, see sklearn/datasets/images/README.txt), copied to a temp
    folder the web server may serve. Their truth is unknown."""
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
        out.append([str(dest / name), q, "unknown (a photo)"])
    return out
