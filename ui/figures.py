"""Pictures for the explorer: heatmap overlays, the 3-D reliance path, latency and evaluation plots.

Pure functions (PIL, numpy, plotly; no Gradio), so the UI stays a thin wiring layer and the
drawing can be tested on its own.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
from PIL import Image, ImageDraw, ImageFont

# a short perceptual ramp (dark blue -> purple -> orange -> yellow), interpolated per pixel
_RAMP = np.array([[13, 8, 135], [126, 3, 168], [204, 71, 120], [248, 149, 64], [240, 249, 33]], dtype=np.float32)


def colormap(values: np.ndarray) -> np.ndarray:
    """[0, 1] values (any shape) -> uint8 RGB of that shape + (3,)."""
    v = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float32)), 0.0, 1.0) * (len(_RAMP) - 1)
    lo = np.floor(v).astype(np.int64)
    hi = np.minimum(lo + 1, len(_RAMP) - 1)
    f = (v - lo)[..., None]
    return (_RAMP[lo] * (1 - f) + _RAMP[hi] * f).astype(np.uint8)


def normalise(heatmap: np.ndarray, scale: tuple[float, float] | None = None) -> np.ndarray:
    """Scale to [0, 1]: with `scale` = (low, high) on that fixed range (a shared scale, so spans
    compare), else min-max per map (each span's own range); a constant map becomes zeros."""
    h = np.asarray(heatmap, dtype=np.float32)
    lo, hi = (float(np.nanmin(h)), float(np.nanmax(h))) if scale is None else (float(scale[0]), float(scale[1]))
    return np.clip((h - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(h)


def span_scale(
    scores: Sequence[np.ndarray], i: int, shared: bool = True, symmetric: bool = False
) -> tuple[float, float]:
    """The colour range for span i: over every span's scores (`shared`, default) or its own."""
    vals = [np.asarray(s, dtype=np.float64).reshape(-1) for s in (scores if shared else [scores[i]])]
    v = np.concatenate(vals) if vals else np.zeros(1)
    v = v[np.isfinite(v)] if v.size else v
    if not v.size:
        return 0.0, 1.0
    lo, hi = float(v.min()), float(v.max())
    if symmetric:
        m = max(abs(lo), abs(hi))
        lo, hi = -m, m
    return (lo, hi) if hi > lo else (lo - 0.5, lo + 0.5)


def font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """PIL's bundled scalable font at `size` px (no system fonts needed)."""
    return ImageFont.load_default(size=max(8, int(size)))


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
    scale: tuple[float, float] | None = None,
) -> Image.Image:
    """Blend a span's (H, W) region-score map over the image, draw region outlines in white and
    number the top regions (1 = highest) in labels sized to the image. `scale`: the (low, high)
    colour range (default: this map's own min-max). `point`: an (x, y) in [0, 1] marked with a
    cross (an annotator's click). The heatmap must have the image's size (w, h) = (W, H)."""
    base = image.convert("RGB")
    h = np.asarray(heatmap)
    if (h.shape[1], h.shape[0]) != base.size:
        base = base.resize((h.shape[1], h.shape[0]))
    rgb = np.asarray(base, dtype=np.float32)
    heat = colormap(normalise(h, scale)).astype(np.float32)
    out = rgb * (1 - alpha) + heat * alpha
    if outlines is not None:
        out[np.asarray(outlines, dtype=bool)] = 255.0
    img = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    size = max(11, min(img.width, img.height) // 14)
    f = font(size)
    if centres is not None:
        for rank, r in enumerate(top_regions):
            if 0 <= int(r) < len(centres):
                x, y = centres[int(r)]
                label = str(rank + 1)
                x0, y0, x1, y1 = draw.textbbox((x, y), label, font=f, anchor="mm")
                pad = max(2, size // 5)
                draw.rounded_rectangle([x0 - pad, y0 - pad, x1 + pad, y1 + pad], radius=pad, fill=(0, 0, 0))
                draw.text((x, y), label, fill=(255, 255, 255), font=f, anchor="mm")
    if point is not None:
        x, y = point[0] * img.width, point[1] * img.height
        arm = max(8, size // 2)
        for d, col in ((2, (0, 0, 0)), (0, (0, 255, 120))):
            draw.line([x - arm, y, x + arm, y], fill=col, width=3 + d)
            draw.line([x, y - arm, x, y + arm], fill=col, width=3 + d)
    return img


def with_colorbar(img: Image.Image, scale: tuple[float, float], title: str = "score") -> Image.Image:
    """`img` with a vertical colour bar on its right, labelled with the scale's ends and middle
    (what a colour means, in the estimator's units: predicted ablation effect)."""
    lo, hi = float(scale[0]), float(scale[1])
    h = img.height
    size = max(10, min(18, h // 16))
    f = font(size)
    bar_w, pad = max(12, h // 20), size // 2 + 4
    labels = [f"{v:.3g}" for v in (hi, (lo + hi) / 2, lo)]
    text_w = max(int(ImageDraw.Draw(img).textlength(t, font=f)) for t in [*labels, title]) + 6
    out = Image.new("RGB", (img.width + pad + bar_w + text_w + 4, h), (255, 255, 255))
    out.paste(img, (0, 0))
    top, bottom = size + size // 2 + 8, h - size // 2 - 2  # room for the title above the top label
    ramp = colormap(np.linspace(1.0, 0.0, max(2, bottom - top))[:, None].repeat(bar_w, 1))
    out.paste(Image.fromarray(ramp), (img.width + pad, top))
    draw = ImageDraw.Draw(out)
    draw.rectangle([img.width + pad, top, img.width + pad + bar_w - 1, bottom - 1], outline=(60, 60, 60))
    x = img.width + pad + bar_w + 3
    draw.text((img.width + pad, 1), title, fill=(30, 30, 30), font=f)
    for t, y in zip(labels, (top, (top + bottom) / 2, bottom)):
        draw.text((x, y), t, fill=(30, 30, 30), font=f, anchor="lm")
    return out


def png_data_uri(img: Image.Image) -> str:
    """A PNG as a data: URI (for a plotly image trace or an HTML report: no file to serve)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def plotly_colorscale() -> list[list[Any]]:
    """The overlay's colour ramp as a plotly colorscale (so the interactive view matches)."""
    n = len(_RAMP) - 1
    return [[i / n, f"rgb({r},{g},{b})"] for i, (r, g, b) in enumerate(_RAMP.astype(int))]


def span_figure(
    image: Image.Image,
    pixel_labels: np.ndarray,
    scores: np.ndarray,
    scale: tuple[float, float],
    outlines: np.ndarray | None = None,
    top_regions: Sequence[int] = (),
    centres: np.ndarray | None = None,
    title: str = "",
    max_side: int = 96,
) -> go.Figure:
    """The large span view: the image with the span's region scores blended over it, a colour
    bar, the top regions numbered, and the region id and score under the mouse. `pixel_labels`:
    (H, W) region per pixel of the drawn size; scores are painted on a grid of at most `max_side`
    cells a side (hover and colour need no more)."""
    lab = np.asarray(pixel_labels)
    H, W = lab.shape
    base = image.convert("RGB")
    if base.size != (W, H):
        base = base.resize((W, H))
    if outlines is not None:
        arr = np.asarray(base).copy()
        arr[np.asarray(outlines, dtype=bool)] = 255
        base = Image.fromarray(arr)
    step = max(1, int(np.ceil(max(H, W) / max_side)))
    ys, xs = np.arange(step // 2, H, step), np.arange(step // 2, W, step)
    grid = lab[np.ix_(ys, xs)]
    sc = np.asarray(scores, dtype=np.float64).reshape(-1)
    z = sc[grid]
    fig = go.Figure()
    fig.add_trace(go.Image(source=png_data_uri(base), hoverinfo="skip"))
    fig.add_trace(
        go.Heatmap(
            z=z,
            x=xs,
            y=ys,
            customdata=grid,
            zmin=scale[0],
            zmax=scale[1],
            colorscale=plotly_colorscale(),
            opacity=0.6,
            hovertemplate="region %{customdata}<br>score %{z:.4f}<extra></extra>",
            colorbar=dict(title=dict(text="score", side="right"), thickness=14),
            name="scores",
        )
    )
    if centres is not None:
        for rank, r in enumerate(top_regions):
            if 0 <= int(r) < len(centres):
                x, y = centres[int(r)]
                fig.add_annotation(
                    x=float(x),
                    y=float(y),
                    text=f"<b>{rank + 1}</b>",
                    showarrow=False,
                    font=dict(size=18, color="white"),
                    bgcolor="rgba(0,0,0,0.75)",
                    borderpad=3,
                )
    fig.update_layout(
        title=dict(text=title, font=dict(size=14)) if title else None,
        margin=dict(l=0, r=0, t=36 if title else 4, b=0),
        height=520,
        xaxis=dict(visible=False, range=[-0.5, W - 0.5], constrain="domain"),
        yaxis=dict(visible=False, range=[H - 0.5, -0.5], scaleanchor="x", constrain="domain"),
        plot_bgcolor="white",
    )
    return fig


LABEL_COLOURS = {"Fixation": "#d62728", "Wandering": "#ff7f0e", "stable": "#2ca02c"}


def path_figure(
    path: np.ndarray | None,
    texts: Sequence[str] = (),
    title: str = "",
    label: str | None = None,
    risks: Sequence[float] = (),
) -> go.Figure:
    """Plotly 3-D figure of the PCA reliance path: one marker per closed span coloured by step,
    joined in order by a line in the trace label's colour (Fixation red, Wandering orange, stable
    green); hover shows the span text and, when a risk model ran, the failure risk after that
    span. An empty path gives an empty, labelled plot."""
    fig = go.Figure()
    p = np.zeros((0, 3)) if path is None else np.asarray(path, dtype=np.float64).reshape(-1, 3)
    if len(p):
        steps = np.arange(1, len(p) + 1)
        hover = [f"step {i}: {t}" for i, t in zip(steps, list(texts) + [""] * (len(p) - len(texts)))]
        hover = [h + (f" · failure risk {r:.0%}" if r is not None else "") for h, r in zip(hover, _pad(risks, len(p)))]
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
                line=dict(color=LABEL_COLOURS.get(label or "", "#888"), width=4),
                name=f"path ({label})" if label else "path",
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


def _pad(values: Sequence[float], n: int) -> list[float | None]:
    return [float(v) for v in list(values)[:n]] + [None] * max(0, n - len(values))


def dynamics_markdown(
    path_length: float | None,
    tortuosity: float | None,
    label: str,
    n_spans: int,
    final: bool = False,
    risk: float | None = None,
    risk_auc: dict[str, Any] | None = None,
) -> str:
    """The path-shape readout (reason-dynamics), with the failure risk when a risk model ran."""
    tort = "n/a (fewer than 2 spans or no net displacement)" if tortuosity is None else f"{tortuosity:.2f}"
    pl = 0.0 if path_length is None else path_length
    kind = "trace label" if final else "label so far"
    out = f"**Path length** {pl:.3f} · **Tortuosity** {tort} · **{kind}** {label} · spans {n_spans}"
    if risk is not None:
        auc = (risk_auc or {}).get("0.3")
        held = f" (its held-out AUC at 30% of the reasoning: {auc:.2f})" if isinstance(auc, float) else ""
        out += f"\n\n**Failure risk** {risk:.0%} from the reliance path so far{held}"
    return out


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
