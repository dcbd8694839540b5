"""Pictures for the explorer: heatmap overlays, the 3-D reliance path, latency and evaluation plots.

Pure functions (PIL, numpy, plotly; no Gradio), so the UI stays a thin wiring layer and the
drawing can be tested on its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
from PIL import Image, ImageDraw

# a short perceptual ramp (dark blue -> purple -> orange -> yellow), interpolated per pixel
_RAMP = np.array([[13, 8, 135], [126, 3, 168], [204, 71, 120], [248, 149, 64], [240, 249, 33]], dtype=np.float32)


def colormap(values: np.ndarray) -> np.ndarray:
    """[0, 1] values (any shape) -> uint8 RGB of that shape + (3,)."""
    v = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float32)), 0.0, 1.0) * (len(_RAMP) - 1)
    lo = np.floor(v).astype(np.int64)
    hi = np.minimum(lo + 1, len(_RAMP) - 1)
    f = (v - lo)[..., None]
    return (_RAMP[lo] * (1 - f) + _RAMP[hi] * f).astype(np.uint8)


def normalise(heatmap: np.ndarray) -> np.ndarray:
    """Min-max scale to [0, 1] per map (each span's own range, so weak spans stay readable);
    a constant map becomes zeros."""
    h = np.asarray(heatmap, dtype=np.float32)
    lo, hi = float(np.nanmin(h)), float(np.nanmax(h))
    return (h - lo) / (hi - lo) if hi > lo else np.zeros_like(h)


def region_centres(pixel_labels: np.ndarray, k: int) -> np.ndarray:
    """(k, 2) (x, y) pixel centre of each region's pixels (for numbering the top regions)."""
    lab = np.asarray(pixel_labels)
    ys, xs = np.indices(lab.shape)
    flat = lab.ravel()
    n = np.bincount(flat, minlength=k).astype(np.float64)
    cx = np.bincount(flat, weights=xs.ravel(), minlength=k) / np.maximum(n, 1)
    cy = np.bincount(flat, weights=ys.ravel(), minlength=k) / np.maximum(n, 1)
    return np.stack([cx, cy], axis=1)


def overlay(
    image: Image.Image,
    heatmap: np.ndarray,
    outlines: np.ndarray | None = None,
    top_regions: Sequence[int] = (),
    centres: np.ndarray | None = None,
    alpha: float = 0.6,
    point: tuple[float, float] | None = None,
) -> Image.Image:
    """Blend a span's (H, W) region-score map over the image, draw region outlines in white and
    number the top regions (1 = highest). `point`: an (x, y) in [0, 1] marked with a cross
    (an annotator's click). The heatmap must have the image's size (w, h) = (W, H)."""
    base = image.convert("RGB")
    h = np.asarray(heatmap)
    if (h.shape[1], h.shape[0]) != base.size:
        base = base.resize((h.shape[1], h.shape[0]))
    rgb = np.asarray(base, dtype=np.float32)
    heat = colormap(normalise(h)).astype(np.float32)
    out = rgb * (1 - alpha) + heat * alpha
    if outlines is not None:
        out[np.asarray(outlines, dtype=bool)] = 255.0
    img = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    if centres is not None:
        for rank, r in enumerate(top_regions):
            if 0 <= int(r) < len(centres):
                x, y = centres[int(r)]
                label = str(rank + 1)
                draw.rectangle([x - 5, y - 7, x + 5 + 5 * (len(label) - 1), y + 6], fill=(0, 0, 0))
                draw.text((x - 3, y - 6), label, fill=(255, 255, 255))
    if point is not None:
        x, y = point[0] * img.width, point[1] * img.height
        for d, col in ((2, (0, 0, 0)), (0, (0, 255, 120))):
            draw.line([x - 8, y, x + 8, y], fill=col, width=3 + d)
            draw.line([x, y - 8, x, y + 8], fill=col, width=3 + d)
    return img


def path_figure(path: np.ndarray | None, texts: Sequence[str] = (), title: str = "") -> go.Figure:
    """Plotly 3-D figure of the PCA reliance path: one marker per closed span coloured by step,
    joined in order; hover shows the span text. An empty path gives an empty, labelled plot."""
    fig = go.Figure()
    p = np.zeros((0, 3)) if path is None else np.asarray(path, dtype=np.float64).reshape(-1, 3)
    if len(p):
        steps = np.arange(1, len(p) + 1)
        hover = [f"step {i}: {t}" for i, t in zip(steps, list(texts) + [""] * (len(p) - len(texts)))]
        fig.add_trace(
            go.Scatter3d(
                x=p[:, 0],
                y=p[:, 1],
                z=p[:, 2],
                mode="lines+markers+text",
                text=[str(s) for s in steps],
                hovertext=hover,
                hoverinfo="text",
                marker=dict(
                    size=6,
                    color=steps,
                    colorscale="Viridis",
                    cmin=1,
                    cmax=max(2, len(p)),
                    colorbar=dict(title="step", thickness=12),
                ),
                line=dict(color="#888", width=3),
                name="path",
            )
        )
    fig.update_layout(
        title=title or None,
        margin=dict(l=0, r=0, t=30 if title else 0, b=0),
        height=380,
        scene=dict(xaxis_title="PC1", yaxis_title="PC2", zaxis_title="PC3"),
        showlegend=False,
    )
    return fig


def dynamics_markdown(
    path_length: float | None, tortuosity: float | None, label: str, n_spans: int, final: bool = False
) -> str:
    """The path-shape readout (reason-dynamics)."""
    tort = "n/a (fewer than 2 spans or no net displacement)" if tortuosity is None else f"{tortuosity:.2f}"
    pl = 0.0 if path_length is None else path_length
    kind = "trace label" if final else "label so far"
    return f"**Path length** {pl:.3f} · **Tortuosity** {tort} · **{kind}** {label} · spans {n_spans}"


def latency_figure(rows: Sequence[dict[str, Any]]) -> go.Figure:
    """Grouped bars of TTFT and delay (seconds) per paradigm, from `RunResult.metrics` dicts with
    a 'paradigm' key added."""
    names = [r["paradigm"] for r in rows]
    fig = go.Figure()
    for key, label in (("ttft_question_s", "TTFT after question (s)"), ("delay_s", "delay: last answer token (s)")):
        fig.add_trace(go.Bar(name=label, x=names, y=[r.get(key) for r in rows]))
    fig.update_layout(barmode="group", height=320, margin=dict(l=40, r=10, t=30, b=30), yaxis_title="seconds")
    return fig


def eval_rows(res: dict[str, Any]) -> list[list[Any]]:
    """`vstream.attr.evaluate.evaluate` result -> table rows [method, LDS, R^2, top-5 drop, pointing, s/span]."""
    rows = []
    for m in res.get("lds", {}):
        rows.append(
            [
                m,
                res["lds"].get(m),
                res.get("r2", {}).get(m),
                res.get("top5_drop", {}).get(m),
                res.get("pointing", {}).get(m),
                res.get("seconds_per_span", {}).get(m),
            ]
        )
    return rows


EVAL_HEADERS = ["method", "LDS", "R^2", "top-5 drop (nats)", "pointing", "seconds / span"]


def eval_figure(res: dict[str, Any]) -> go.Figure:
    """Bars of LDS and R^2 per method (higher is better)."""
    methods = list(res.get("lds", {}))
    fig = go.Figure()
    for key, label in (("lds", "LDS"), ("r2", "R^2")):
        fig.add_trace(go.Bar(name=label, x=methods, y=[res.get(key, {}).get(m) for m in methods]))
    fig.update_layout(
        barmode="group",
        height=320,
        margin=dict(l=40, r=10, t=30, b=30),
        title=f"held-out scenes: {res.get('n', '?')}, spans scored: {res.get('n_spans_lds', '?')}",
    )
    return fig
