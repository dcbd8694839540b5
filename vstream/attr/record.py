"""One attributed run as a record you can keep: build it from the live events, save it as one JSON
file, reopen it, and score one of its spans with another method later.

    record = attribute_run(vlm, image, question, estimator)    # runs to the end
    record.save("runs/run.json"); again = load_run("runs/run.json")

Why a library type: the explorer, the report and a notebook must agree on what a run is, so the
format lives here, below the UI. The file is plain JSON (image as base64 PNG, region maps as
integer lists); nothing in it is ever unpickled or executed, and `RunRecord.from_dict` checks
every field's type, size and range, so any malformed file gives one `RunFileError` line.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vstream.attr.ablation import ablation_effects
from vstream.attr.capture import span_features
from vstream.attr.estimator import Estimator, LinearEstimator, RawAttention
from vstream.attr.regions import Regions
from vstream.attr.spans import Span
from vstream.attr.worker import (
    AttributionSession,
    DoneEvent,
    Event,
    PathEvent,
    RegionsEvent,
    SpanEvent,
    TokenEvent,
    attribute_stream,
)
from vstream.model import VLM, VLMError, model_identity, normalize_image

__all__ = [
    "FORMAT",
    "MAX_RUN_FILE_BYTES",
    "RunFileError",
    "RunRecord",
    "SpanRecord",
    "attribute_run",
    "estimator_identity",
    "load_run",
    "score_span",
]

FORMAT = "vstream-run"
VERSION = 1
MAX_RUN_FILE_BYTES = 24 * 1024 * 1024  # a 2,048 px PNG plus maps stays well under this
MAX_K = 4096
MAX_SPANS = 4096
MAX_TOKENS = 65_536
MAX_GRID = 1024  # region label grid side
MAX_TEXT = 1_000_000
COMPARE_METHODS = ("vstream", "raw_attention", "occlusion")


class RunFileError(VLMError):
    """A run file (or dict) that is not a readable vSTREAM run; the message is one line."""


# ----------------------------------------------------------------------------------------------
# the record


@dataclass
class SpanRecord:
    """One thinking sentence and its region scores. `methods` holds every method's scores for
    it, e.g. {"vstream": {"scores": [...], "ms": 0.1}, "raw_attention": {...}}; `scores` is the
    run's own method (`RunRecord.method`)."""

    index: int
    kind: str
    text: str
    token_start: int
    token_end: int
    scores: np.ndarray
    top_regions: list[int]
    latency_ms: float = 0.0
    scores_ms: float = 0.0
    rows: tuple[int, int] = (0, 0)
    note: str = ""
    methods: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "kind": self.kind,
            "text": self.text,
            "token_start": self.token_start,
            "token_end": self.token_end,
            "scores": _floats(self.scores),
            "top_regions": list(self.top_regions),
            "latency_ms": round(float(self.latency_ms), 3),
            "scores_ms": round(float(self.scores_ms), 4),
            "rows": list(self.rows),
            "note": self.note,
            "methods": {
                m: {"scores": _floats(v["scores"]), "ms": round(float(v["ms"]), 4)} for m, v in self.methods.items()
            },
        }


@dataclass
class RunRecord:
    """Everything one attributed run leaves: trace, spans, scores, regions, path, model and
    estimator identity, timings. Fold events in with `apply`; `to_dict` / `from_dict` are the
    file format (`save`, `load_run`)."""

    run_id: str
    model: str
    question: str
    image: Image.Image
    image_ref: str = ""
    created_at: str = ""
    model_identity: dict[str, Any] = field(default_factory=dict)
    estimator: dict[str, Any] = field(default_factory=dict)
    method: str = "vstream"
    regions: Regions | None = None
    image_size: tuple[int, int] = (0, 0)
    tokens: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    spans: list[SpanRecord] = field(default_factory=list)
    text: str = ""
    answer: str = ""
    label: str = "stable"
    path: np.ndarray | None = None
    path_length: float = 0.0
    tortuosity: float | None = None
    risk: list[float] = field(default_factory=list)  # P(failure) after each span, when a risk model ran
    timings: dict[str, float] = field(default_factory=dict)
    done: bool = False
    cancelled: bool = False
    error: str | None = None
    _t0: float = field(default_factory=time.perf_counter, repr=False)

    @classmethod
    def new(
        cls,
        model: str,
        question: str,
        image: Image.Image,
        image_ref: str = "",
        vlm: VLM | None = None,
        estimator: Estimator | None = None,
    ) -> RunRecord:
        """A fresh record with a new id and the model's and estimator's identity."""
        est = estimator_identity(estimator)
        return cls(
            run_id=uuid.uuid4().hex[:12],
            model=model,
            question=question,
            image=image.convert("RGB"),
            image_ref=image_ref,
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            model_identity=model_identity(vlm) if vlm is not None else {},
            estimator=est,
            method="vstream" if est.get("kind") == "linear" else "raw_attention",
        )

    # -- building it from events -----------------------------------------------------------
    def apply(self, ev: Event) -> None:
        """Fold one `attribute_stream` event into the record."""
        if isinstance(ev, RegionsEvent):
            self.regions, self.image_size = ev.regions, tuple(ev.image_size)
        elif isinstance(ev, TokenEvent):
            self.tokens.append(ev.text)
            self.token_ids.append(int(ev.token_id))
        elif isinstance(ev, SpanEvent):
            s = ev.span
            scores = np.asarray(ev.scores, dtype=np.float32).reshape(-1)
            self.spans.append(
                SpanRecord(
                    s.index,
                    s.kind,
                    s.text,
                    int(s.token_start),
                    int(s.token_end),
                    scores,
                    [int(r) for r in ev.top_regions],
                    float(ev.latency_ms),
                    float(ev.scores_ms),
                    (int(ev.rows[0]), int(ev.rows[1])),
                    ev.note,
                    {self.method: {"scores": scores, "ms": float(ev.scores_ms)}},
                )
            )
        elif isinstance(ev, PathEvent):
            p = ev.point
            self.path, self.path_length, self.tortuosity, self.label = (
                np.asarray(p.path, dtype=np.float64),
                float(p.path_length),
                None if p.tortuosity is None else float(p.tortuosity),
                p.label,
            )
            if ev.risk is not None:
                self.risk.append(float(ev.risk))
        elif isinstance(ev, DoneEvent):
            self.text, self.answer, self.label = ev.text, ev.answer, ev.label
            self.cancelled, self.error, self.done = ev.cancelled, ev.error, True
            self.token_ids = list(ev.token_ids) or self.token_ids
            gen = ev.gen_end_time - ev.gen_start_time if ev.gen_end_time else 0.0
            self.timings = {
                "total_s": round(time.perf_counter() - self._t0, 3),
                "generate_s": round(max(0.0, gen), 3),
                "first_token_s": round(max(0.0, ev.first_token_time - ev.gen_start_time), 3),
                "tokens_per_s": round(float(ev.tokens_per_s), 2),
                "n_tokens": int(ev.n_tokens),
            }

    def add_raw_attention(self, session: AttributionSession) -> None:
        """Score every span with raw attention from the rows the session recorded (no extra
        pass; a few microseconds per span), so the compare view has it for free."""
        if self.regions is None:
            return
        # numpy, as the live worker computes features (a torch matmul here would wait on a threaded BLAS)
        assign = self.regions.assignment.detach().cpu().numpy()
        for s in self.spans:
            if "raw_attention" in s.methods:
                continue
            lo, hi = s.rows
            t0 = time.perf_counter()
            if hi > lo:
                f = span_features(session.recorder, lo, hi, assign)  # torch when the rows live on a GPU
                feats = f.detach().float().cpu().numpy() if isinstance(f, torch.Tensor) else np.asarray(f, np.float32)
                scores = feats.sum(-1)  # = RawAttention().predict: the features summed over layers and heads
            else:
                scores = np.zeros(self.regions.k, dtype=np.float32)
            s.methods["raw_attention"] = {"scores": scores, "ms": (time.perf_counter() - t0) * 1000.0}

    # -- reading it --------------------------------------------------------------------------
    @property
    def k(self) -> int:
        return 0 if self.regions is None else int(self.regions.k)

    def pixel_labels(self) -> np.ndarray | None:
        """(H, W) region id per pixel at the size the heatmaps are drawn at."""
        return None if self.regions is None else self.regions.pixel_labels(self.image_size or None)

    def span_scores(self, i: int, method: str | None = None) -> np.ndarray:
        s = self.spans[i]
        if method is None or method == self.method:
            return np.asarray(s.scores, dtype=np.float32)
        return np.asarray(s.methods[method]["scores"], dtype=np.float32)

    def score_range(self, method: str | None = None) -> tuple[float, float]:
        """(low, high) over every span's scores: the shared colour scale."""
        vals = [self.span_scores(i, method) for i, s in enumerate(self.spans) if (method or self.method) in s.methods]
        if not vals:
            return 0.0, 1.0
        allv = np.concatenate(vals)
        return float(np.nanmin(allv)), float(np.nanmax(allv))

    # -- the file format -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The run as JSON-ready data (the file's content and the `/attribute` API's answer)."""
        buf = io.BytesIO()
        self.image.save(buf, format="PNG")
        reg = self.regions
        return {
            "format": FORMAT,
            "version": VERSION,
            "run_id": self.run_id,
            "created_at": self.created_at,
            "model": self.model,
            "model_identity": self.model_identity,
            "estimator": self.estimator,
            "method": self.method,
            "question": self.question,
            "image_ref": self.image_ref,
            "image": {
                "png_base64": base64.b64encode(buf.getvalue()).decode("ascii"),
                "width": self.image.width,
                "height": self.image.height,
            },
            "k": self.k or None,
            "regions": None
            if reg is None
            else {
                "labels": np.asarray(reg.labels).astype(int).tolist(),
                "token_labels": [int(x) for x in reg.token_labels],
                "token_grid": list(reg.token_grid),
                "image_size": list(self.image_size or reg.image_size),
                "backbone": reg.backbone,
            },
            "tokens": list(self.tokens),
            "token_ids": [int(t) for t in self.token_ids],
            "spans": [s.to_dict() for s in self.spans],
            "text": self.text or "".join(self.tokens),
            "answer": self.answer,
            "label": self.label,
            "path": [] if self.path is None else np.round(np.asarray(self.path, dtype=float), 6).tolist(),
            "path_length": round(float(self.path_length), 6),
            "tortuosity": None if self.tortuosity is None else round(float(self.tortuosity), 6),
            "risk": [round(float(r), 6) for r in self.risk],
            "timings": dict(self.timings),
            "done": self.done,
            "cancelled": self.cancelled,
            "error": self.error,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, separators=(",", ":"), allow_nan=False)

    def save(self, path: str | Path) -> Path:
        """Write the run as one JSON file (atomically: a temp file, then a rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.to_json(), encoding="utf-8")
        tmp.replace(path)
        return path

    @classmethod
    def from_dict(cls, d: Any) -> RunRecord:
        """Rebuild a run from `to_dict` data, checking everything; RunFileError if malformed."""
        try:
            return _parse(d)
        except RunFileError:
            raise
        except (KeyError, TypeError, ValueError, IndexError, OverflowError, AttributeError) as e:
            raise RunFileError(f"not a readable vSTREAM run file ({type(e).__name__})") from None

    @classmethod
    def from_bytes(cls, data: bytes) -> RunRecord:
        if len(data) > MAX_RUN_FILE_BYTES:
            raise RunFileError(f"run file too large ({len(data):,} bytes, at most {MAX_RUN_FILE_BYTES:,})")
        try:
            d = json.loads(data.decode("utf-8"), parse_constant=_no_constant)
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise RunFileError("not a vSTREAM run file: it is not JSON text") from None
        return cls.from_dict(d)


def load_run(path: str | Path) -> RunRecord:
    """Read a run file written by `RunRecord.save` (JSON only; size-capped before reading)."""
    p = Path(path)
    try:
        size = p.stat().st_size
        if size > MAX_RUN_FILE_BYTES:
            raise RunFileError(f"run file too large ({size:,} bytes, at most {MAX_RUN_FILE_BYTES:,})")
        data = p.read_bytes()
    except OSError:
        raise RunFileError(f"could not read run file {p.name}") from None
    return RunRecord.from_bytes(data)


# ----------------------------------------------------------------------------------------------
# running and re-scoring


def estimator_identity(estimator: Estimator | None) -> dict[str, Any]:
    """What a run records of the estimator that scored it (JSON scalars of its metadata)."""
    if isinstance(estimator, LinearEstimator):
        meta = {
            k: v
            for k, v in estimator.meta.items()
            if isinstance(v, (int, float, bool)) or v is None or (isinstance(v, str) and len(v) <= 120)
        }
        w = estimator.weight.detach().float().cpu().numpy().tobytes()
        meta["weights_sha1"] = hashlib.sha1(w).hexdigest()[:16]
        return {"kind": "linear", "meta": meta}
    if estimator is None or isinstance(estimator, RawAttention):
        return {"kind": "raw_attention", "meta": {}}
    return {"kind": type(estimator).__name__, "meta": {}}


def attribute_run(
    vlm: VLM,
    image: Any,
    question: str,
    estimator: Estimator,
    model: str = "",
    image_ref: str = "",
    **kwargs: Any,
) -> RunRecord:
    """Run `attribute_stream` to the end and return its `RunRecord` (the same record the
    explorer shows, saves and reports). Keyword extras go to `attribute_stream`."""
    img = normalize_image(image)
    rec = RunRecord.new(model or model_identity(vlm).get("model", ""), question, img, image_ref, vlm, estimator)
    with attribute_stream(vlm, img, question, estimator, **kwargs) as session:
        for ev in session:
            rec.apply(ev)
        rec.add_raw_attention(session)
    return rec


def score_span(vlm: VLM, record: RunRecord, i: int, method: str, estimator: Estimator | None = None) -> dict[str, Any]:
    """Scores of span `i` by `method` ("occlusion" runs K ablated forward passes; "vstream" and
    "raw_attention" come from the record), stored in the span's `methods` and returned as
    {"scores", "ms"}. Rebuilds the inputs from the record's image and question, so it works on
    a reopened run as long as `vlm` is the model it was made with."""
    if not 0 <= i < len(record.spans):
        raise VLMError(f"span {i} does not exist (this run has {len(record.spans)})")
    s = record.spans[i]
    if method in s.methods:
        return s.methods[method]
    if method != "occlusion":
        raise VLMError(f"{method} scores were not recorded for this run")
    if record.regions is None or not record.token_ids:
        raise VLMError("this run has no regions or tokens to re-score")
    inputs = vlm.build_inputs(record.question, image=record.image)
    n_img = int(len(inputs.image_token_positions))
    if n_img != record.regions.assignment.shape[1]:
        raise VLMError(
            f"this run was made with another model or image processor ({record.regions.assignment.shape[1]} image "
            f"tokens, this model gives {n_img})"
        )
    gen = torch.tensor(record.token_ids, dtype=torch.long)
    span = Span(s.index, s.kind, s.text, s.token_start, min(s.token_end, len(record.token_ids)))
    t0 = time.perf_counter()
    eff = ablation_effects(vlm, inputs, gen, [span], torch.eye(record.k, dtype=torch.bool), record.regions.assignment)
    out = {"scores": eff.detach().float().cpu().numpy().reshape(-1), "ms": (time.perf_counter() - t0) * 1000.0}
    s.methods[method] = out
    return out


# ----------------------------------------------------------------------------------------------
# checked parsing


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _floats(values: Any) -> list[float]:
    return [round(float(v), 6) if math.isfinite(float(v)) else 0.0 for v in np.asarray(values).reshape(-1)]


def _need(cond: bool, what: str) -> None:
    if not cond:
        raise RunFileError(f"not a readable vSTREAM run file: {what}")


def _str(d: dict, key: str, limit: int = 10_000, optional: bool = False) -> str:
    v = d.get(key, "" if optional else None)
    _need(isinstance(v, str) and len(v) <= limit, f"'{key}' must be text of at most {limit:,} characters")
    return v


def _int(v: Any, what: str, lo: int = 0, hi: int = 2**31) -> int:
    _need(isinstance(v, int) and not isinstance(v, bool) and lo <= v < hi, f"{what} must be an integer in [{lo}, {hi})")
    return int(v)


def _num(v: Any, what: str) -> float:
    _need(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)),
        f"{what} must be a finite number",
    )
    return float(v)


def _vec(v: Any, what: str, n: int | None = None, limit: int = MAX_K) -> np.ndarray:
    _need(isinstance(v, list) and len(v) <= limit, f"{what} must be a list of at most {limit} numbers")
    vals = [_num(x, what) for x in v]
    _need(all(abs(x) <= 1e30 for x in vals), f"{what} must be numbers of at most 1e30")
    out = np.array(vals, dtype=np.float32)
    _need(n is None or len(out) == n, f"{what} must have {n} values")
    return out


def _image(d: Any) -> Image.Image:
    _need(isinstance(d, dict), "'image' must be an object")
    raw = d.get("png_base64")
    _need(isinstance(raw, str) and len(raw) <= MAX_RUN_FILE_BYTES * 2, "'image.png_base64' must be text")
    try:
        data = base64.b64decode(raw, validate=True)
    except ValueError:
        raise RunFileError("not a readable vSTREAM run file: the image is not base64") from None
    _need(data[:8] == b"\x89PNG\r\n\x1a\n", "the image must be a PNG")
    try:
        return normalize_image(data)
    except VLMError as e:
        raise RunFileError(f"not a readable vSTREAM run file: {e}") from None


def _regions(d: Any, size: tuple[int, int]) -> Regions | None:
    if d is None:
        return None
    _need(isinstance(d, dict), "'regions' must be an object or null")
    labels = d.get("labels")
    _need(isinstance(labels, list) and 0 < len(labels) <= MAX_GRID, "'regions.labels' must be a non-empty grid")
    width = len(labels[0]) if isinstance(labels[0], list) else -1
    _need(0 < width <= MAX_GRID, "'regions.labels' rows must be non-empty lists")
    grid = np.array([[_int(x, "region label", 0, MAX_K) for x in row] for row in _rows(labels, width)], dtype=np.int64)
    tl = d.get("token_labels")
    _need(isinstance(tl, list) and 0 < len(tl) <= MAX_TOKENS, "'regions.token_labels' must be a non-empty list")
    token_labels = np.array([_int(x, "token label", 0, MAX_K) for x in tl], dtype=np.int64)
    k = int(max(grid.max(), token_labels.max())) + 1
    _need(set(np.unique(token_labels).tolist()) == set(range(k)), "every region must own at least one image token")
    assignment = torch.zeros(k, len(token_labels))
    assignment[torch.as_tensor(token_labels), torch.arange(len(token_labels))] = 1.0
    tg = d.get("token_grid")
    _need(isinstance(tg, list) and len(tg) == 2, "'regions.token_grid' must be [rows, cols]")
    token_grid = (_int(tg[0], "token grid", 1, MAX_TOKENS), _int(tg[1], "token grid", 1, MAX_TOKENS))
    backbone = d.get("backbone", "")
    _need(isinstance(backbone, str) and len(backbone) <= 200, "'regions.backbone' must be short text")
    return Regions(grid, assignment, token_grid, size, backbone=backbone)


def _rows(labels: list, width: int) -> list[list]:
    for row in labels:
        _need(isinstance(row, list) and len(row) == width, "'regions.labels' must be a rectangular grid")
    return labels


def _span(d: Any, k: int, n_tokens: int, methods_ok: tuple[str, ...]) -> SpanRecord:
    _need(isinstance(d, dict), "every span must be an object")
    start = _int(d.get("token_start"), "span token_start", 0, MAX_TOKENS + 1)
    end = _int(d.get("token_end"), "span token_end", start + 1, n_tokens + 2)
    scores = _vec(d.get("scores"), "span scores", k)
    top = d.get("top_regions")
    _need(isinstance(top, list) and len(top) <= k, "'top_regions' must be a list of region ids")
    methods: dict[str, dict[str, Any]] = {}
    raw_methods = d.get("methods", {})
    _need(isinstance(raw_methods, dict) and len(raw_methods) <= 8, "'methods' must be an object")
    for m, v in raw_methods.items():
        _need(m in methods_ok and isinstance(v, dict), f"unknown method {str(m)[:40]!r}")
        methods[m] = {"scores": _vec(v.get("scores"), f"{m} scores", k), "ms": _num(v.get("ms", 0.0), f"{m} ms")}
    rows = d.get("rows", [start, end])
    _need(isinstance(rows, list) and len(rows) == 2, "'rows' must be [lo, hi]")
    kind = _str(d, "kind", 40)
    return SpanRecord(
        _int(d.get("index"), "span index", 0, MAX_SPANS),
        kind,
        _str(d, "text", MAX_TEXT),
        start,
        end,
        scores,
        [_int(r, "top region", 0, k) for r in top],
        _num(d.get("latency_ms", 0.0), "latency_ms"),
        _num(d.get("scores_ms", 0.0), "scores_ms"),
        (_int(rows[0], "rows", 0, MAX_TOKENS + 1), _int(rows[1], "rows", 0, MAX_TOKENS + 1)),
        _str(d, "note", 2000, optional=True),
        methods,
    )


def _parse(d: Any) -> RunRecord:
    _need(isinstance(d, dict), "the top level must be an object")
    _need(d.get("format") == FORMAT, f"'format' must be {FORMAT!r}")
    _need(d.get("version") == VERSION, f"unsupported version {str(d.get('version'))[:20]!r} (this reads {VERSION})")
    image = _image(d.get("image"))
    reg_d = d.get("regions")
    size = (image.width, image.height)
    if isinstance(reg_d, dict) and isinstance(reg_d.get("image_size"), list) and len(reg_d["image_size"]) == 2:
        size = (
            _int(reg_d["image_size"][0], "image width", 1, 20_000),
            _int(reg_d["image_size"][1], "height", 1, 20_000),
        )
        _need(size[0] * size[1] <= 100_000_000, "the image size is too large")
    regions = _regions(reg_d, size)
    k = 0 if regions is None else regions.k
    tokens = d.get("tokens", [])
    _need(isinstance(tokens, list) and len(tokens) <= MAX_TOKENS, "'tokens' must be a list")
    _need(all(isinstance(t, str) and len(t) <= 1000 for t in tokens), "'tokens' must be text pieces")
    ids = d.get("token_ids", [])
    _need(isinstance(ids, list) and len(ids) <= MAX_TOKENS, "'token_ids' must be a list")
    token_ids = [_int(t, "token id", 0, 2**31) for t in ids]
    spans_d = d.get("spans", [])
    _need(isinstance(spans_d, list) and len(spans_d) <= MAX_SPANS, "'spans' must be a list")
    _need(not spans_d or regions is not None, "spans need regions")
    n_tokens = max(len(tokens), len(token_ids))
    spans = [_span(s, k, n_tokens, COMPARE_METHODS) for s in spans_d]
    path_d = d.get("path", [])
    _need(isinstance(path_d, list) and len(path_d) <= MAX_SPANS, "'path' must be a list")
    path = np.array([_vec(p, "path point", 3, 3) for p in path_d], dtype=np.float64).reshape(-1, 3)
    tort = d.get("tortuosity")
    risk_d = d.get("risk", [])
    _need(isinstance(risk_d, list) and len(risk_d) <= MAX_SPANS, "'risk' must be a list")
    risk = [_num(r, "risk") for r in risk_d]
    _need(all(0.0 <= r <= 1.0 for r in risk), "'risk' values must be probabilities")
    ident = d.get("model_identity", {})
    est = d.get("estimator", {})
    _need(isinstance(ident, dict) and len(_json(ident)) <= 10_000, "'model_identity' must be a small object")
    _need(isinstance(est, dict) and len(_json(est)) <= 10_000, "'estimator' must be a small object")
    timings = d.get("timings", {})
    _need(isinstance(timings, dict) and len(timings) <= 32, "'timings' must be an object")
    err = d.get("error")
    _need(err is None or (isinstance(err, str) and len(err) <= 10_000), "'error' must be text or null")
    method = _str(d, "method", 40, optional=True) or "vstream"
    _need(method in COMPARE_METHODS, f"unknown method {method[:40]!r}")
    return RunRecord(
        run_id=_safe_id(_str(d, "run_id", 64)),
        model=_str(d, "model", 500),
        question=_str(d, "question", 10_000),
        image=image,
        image_ref=_str(d, "image_ref", 2000, optional=True),
        created_at=_str(d, "created_at", 64, optional=True),
        model_identity=ident,
        estimator=est,
        method=method,
        regions=regions,
        image_size=size,
        tokens=list(tokens),
        token_ids=token_ids,
        spans=spans,
        text=_str(d, "text", MAX_TEXT, optional=True),
        answer=_str(d, "answer", MAX_TEXT, optional=True),
        label=_str(d, "label", 40, optional=True) or "stable",
        path=path if len(path) else None,
        path_length=_num(d.get("path_length", 0.0), "path_length"),
        tortuosity=None if tort is None else _num(tort, "tortuosity"),
        risk=risk,
        timings={str(key)[:40]: _num(v, f"timing {str(key)[:40]}") for key, v in timings.items()},
        done=bool(d.get("done", True)),
        cancelled=bool(d.get("cancelled", False)),
        error=err,
    )


def _json(v: Any) -> str:
    """Strict JSON text of `v` (no NaN or infinity, which the file format cannot hold)."""
    try:
        return json.dumps(v, allow_nan=False)
    except (ValueError, TypeError, RecursionError):
        raise RunFileError("not a readable vSTREAM run file: a value that is not plain JSON") from None


def _safe_id(run_id: str) -> str:
    _need(bool(run_id) and all(c.isalnum() or c in "-_" for c in run_id), "'run_id' must be letters, digits, - or _")
    return run_id
