"""Non-UI logic behind the explorer (app.py): input checks, model and estimator choice, the
per-run record that the Reasoning, Annotation and Video tabs read. No Gradio here, so every
rule the page enforces can be tested without a browser.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vstream.world.assets import DEMO_ESTIMATOR, DEMO_MODEL_DIR, EXAMPLES_DIR
from vstream.model import VLMError, normalize_image_with_size

SHIPPED_ESTIMATOR = DEMO_ESTIMATOR
MAX_QUESTION_CHARS = 2000
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


def load_image(image: Any) -> Image.Image:
    """A user's image (path, PIL, array) as given, after the adapter's checks; a corrupt file,
    a missing image or an absurd size gives a one-line VLMError."""
    if image is None or (isinstance(image, str) and not image.strip()):
        raise VLMError("Pick an example or upload an image first.")
    pil, _ = normalize_image_with_size(image)
    return pil


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


def image_ref(image: Any) -> str:
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


def model_key(name: Any) -> str:
    return str(name or "").strip() or str(DEMO_MODEL_DIR)


@lru_cache(maxsize=2)
def _model(name: str) -> Any:
    from vstream.model import load_vlm

    return load_vlm(name)


def get_model(name: Any) -> Any:
    """Load (once, shared by all sessions: weights are read-only, generation takes `vlm.lock`)."""
    with _load_lock:  # two first requests must not load the same model twice
        return _model(model_key(name))


def warm_up(name: Any, video: Any = None) -> None:
    """Load the default model and the video model (`video`, default: the same) and, on CPU,
    start the TaYS frame-ingestion process with the video model, so the first user does not
    wait for either (the ingestion server's imports take seconds). Failures are only logged:
    the first real request reports them properly."""
    try:
        vlm = get_model(name)
        if video is not None and model_key(video) != model_key(name):
            vlm = get_model(video)
        if vlm.device.type == "cpu":
            from tays.ingest import prewarm

            prewarm(vlm)
    except Exception as e:  # noqa: BLE001 - a warm-up must never take the server down
        print(f"warm-up skipped: {type(e).__name__}: {e}", file=sys.stderr)


class RawAttention:
    """Fallback 'estimator' for a model without a trained one: region score = raw attention mass."""

    meta = {"model": "raw attention"}

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        from vstream.attr.estimator import raw_attention_scores

        return raw_attention_scores(features)


@lru_cache(maxsize=4)
def _shipped(path: str, model: str) -> Any:
    from vstream.attr.estimator import load

    return load(path, get_model(model))


def estimator_for(vlm: Any, model: str, session_estimator: Any = None) -> tuple[Any, str]:
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
        return _shipped(str(SHIPPED_ESTIMATOR), model_key(model)), note + "estimator: shipped demo estimator"
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
        return {"index": self.index, "kind": self.kind, "text": self.text,
                "scores": [round(float(s), 6) for s in self.scores], "top_regions": list(self.top_regions),
                "latency_ms": round(float(self.latency_ms), 2)}


@dataclass
class RunRecord:
    """What a finished (or running) attribution run leaves behind for the other tabs."""

    run_id: str
    model: str
    question: str
    image: Image.Image
    image_ref: str
    regions: Any = None
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

    def set_regions(self, regions: Any, image_size: tuple[int, int]) -> None:
        from ui.figures import region_centres

        self.regions = regions
        self.pixel_labels = regions.pixel_labels(image_size)
        self.outlines = regions.outlines(image_size)
        self.centres = region_centres(self.pixel_labels, regions.k)

    def region_at(self, point: tuple[float, float]) -> int | None:
        """Region id under an (x, y) point in [0, 1] of the image."""
        if self.pixel_labels is None:
            return None
        h, w = self.pixel_labels.shape
        x = min(w - 1, max(0, int(point[0] * w)))
        y = min(h - 1, max(0, int(point[1] * h)))
        return int(self.pixel_labels[y, x])

    def overlay(self, i: int, point: tuple[float, float] | None = None) -> Image.Image:
        from ui.figures import overlay

        s = self.spans[i]
        return overlay(self.image, s.heatmap, self.outlines, s.top_regions, self.centres, point=point)

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

    def cleanup(self) -> None:
        if self.out_dir is not None:
            shutil.rmtree(self.out_dir, ignore_errors=True)

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id, "model": self.model, "question": self.question, "image_ref": self.image_ref,
            "k": None if self.regions is None else int(self.regions.k), "spans": [s.to_dict() for s in self.spans],
            "text": self.text, "answer": self.answer, "label": self.label,
            "path_length": round(float(self.path_length), 6),
            "tortuosity": None if self.tortuosity is None else round(float(self.tortuosity), 6),
            "done": self.done, "cancelled": self.cancelled, "error": self.error,
            "estimator": self.estimator_note,
        }


# ----------------------------------------------------------------------------------------------
# examples


def scene_examples() -> list[list[str]]:
    """[[image path, question], ...] from examples/index.json (shapes-world scenes)."""
    index = EXAMPLES_DIR / "index.json"
    if not index.exists():
        return []
    data = json.loads(index.read_text())
    return [[str(EXAMPLES_DIR / s["file"]), s["question"]] for s in data.get("scenes", [])]


def stream_examples() -> list[list[str]]:
    """[[video path, question], ...] from examples/index.json (shapes-world streams)."""
    index = EXAMPLES_DIR / "index.json"
    if not index.exists():
        return []
    data = json.loads(index.read_text())
    return [[str(EXAMPLES_DIR / s["file"]), s["question"]] for s in data.get("streams", [])
            if (EXAMPLES_DIR / s["file"]).is_file()]


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
