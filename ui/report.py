"""A run as one self-contained HTML page: question, answer, trace, every span's heatmap (PNG in
the page) on one shared colour scale, the scores, the 3-D reliance path, model, estimator and
timings.

Why one file with plotly.js inside: a report is attached to an issue or a mail and opened later,
offline, by someone without the explorer; nothing in it loads from the network.
"""

from __future__ import annotations

import html

from ui import figures
from ui.explorer import RunView
from vstream.attr.record import RunRecord


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; }
table { border-collapse: collapse; } td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: left; }
.span { display: flex; gap: 1.5em; align-items: flex-start; margin: 1.2em 0; border-top: 1px solid #eee;
        padding-top: 1em; }
.span img { max-width: 520px; }
.trace { white-space: pre-wrap; background: #f7f7f7; padding: 0.8em; border-radius: 4px; }
.meta td:first-child { color: #555; }
code { font-size: 0.92em; }
"""


def span_png(view: RunView, i: int, scale: tuple[float, float]) -> str:
    """Span i's overlay (drawn as the page draws it) with its colour bar, as a data: URI."""
    return figures.png_data_uri(figures.with_colorbar(view.overlay(i), scale))


_ESTIMATOR_KEYS = ("model", "model_type", "created", "trained_examples", "weights_sha1", "backbone")


def report_html(run: RunRecord) -> str:
    """The whole report; plotly.js is inlined (about 4.7 MB) so the page works offline."""
    view = RunView(run)
    scale = view.scale(0, shared=True) if run.spans else (0.0, 1.0)
    ident = run.model_identity or {}
    est = run.estimator or {}
    meta_rows = [
        ("run", run.run_id),
        ("created", run.created_at),
        (
            "model",
            f"{run.model} ({ident.get('model', '?')}, {ident.get('model_type', '?')}, "
            f"{ident.get('num_layers', '?')} layers x {ident.get('num_heads', '?')} heads)",
        ),
        (
            "estimator",
            f"{est.get('kind', '?')} "
            + ", ".join(f"{k} {v}" for k, v in (est.get("meta") or {}).items() if k in _ESTIMATOR_KEYS),
        ),
        ("method shown", run.method),
        ("image", run.image_ref),
        ("regions", run.k),
        ("timings", ", ".join(f"{k} {v}" for k, v in run.timings.items())),
        (
            "path",
            f"length {run.path_length:.3f}, tortuosity "
            f"{'n/a' if run.tortuosity is None else f'{run.tortuosity:.2f}'}, label {run.label}",
        ),
    ]
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>vSTREAM run {_esc(run.run_id)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_esc(run.question)}</h1>",
        f"<p><b>Answer:</b> {_esc(run.answer or '(none)')}</p>",
        "<table class='meta'>" + "".join(f"<tr><td>{_esc(k)}</td><td>{_esc(v)}</td></tr>" for k, v in meta_rows),
        "</table>",
        "<h2>Reasoning trace</h2>",
        f"<div class='trace'>{_esc(run.text or ''.join(run.tokens))}</div>",
        f"<h2>Spans ({len(run.spans)}), one colour scale for all: {scale[0]:.3g} to {scale[1]:.3g}</h2>",
        "<p>Colour = the estimator's predicted drop in the sentence's log-probability when the region is "
        "removed (higher = relied on more). Numbers mark the top three regions.</p>",
    ]
    for i, s in enumerate(run.spans):
        top = ", ".join(str(r) for r in s.top_regions[:5])
        methods = "".join(
            f"<tr><td>{_esc(m)}</td><td>{v['ms']:.3f} ms</td><td>"
            f"{_esc(', '.join(str(int(r)) for r in (-v['scores']).argsort(kind='stable')[:3]))}</td></tr>"
            for m, v in s.methods.items()
        )
        parts.append(
            f"<div class='span' id='span-{i}'><img alt='span {i} heatmap' src='{span_png(view, i, scale)}'>"
            f"<div><p><b>Span {i}</b> [{_esc(s.kind)}] {_esc(s.text)}</p><p>Top regions: {_esc(top)}; "
            f"heatmap ready {s.latency_ms:.1f} ms after the sentence closed.</p>"
            f"<table><tr><th>method</th><th>time</th><th>top 3 regions</th></tr>{methods}</table>"
            f"<details><summary>scores per region</summary><code>"
            f"{_esc(', '.join(f'{r}: {v:.4f}' for r, v in enumerate(s.scores)))}</code></details></div></div>"
        )
    fig = figures.path_figure(
        run.path, [s.text for s in run.spans], title="Visual reliance path (PCA)", label=run.label, risks=run.risk
    )
    parts += [
        "<h2>Visual reliance path</h2>",
        fig.to_html(full_html=False, include_plotlyjs=True, div_id="reliance-path"),
        "</body></html>",
    ]
    return "\n".join(parts)
