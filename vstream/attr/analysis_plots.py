"""The analysis report's figures, as PNG (matplotlib) and as interactive plotly HTML."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def write_plots(res: dict[str, Any], out: Path) -> list[Path]:
    """AUC by elapsed reasoning, per-step fidelity by elapsed reasoning, path shape of correct vs
    failed traces (when `res` has its per-trace rows); each as `<name>.png` and `<name>.html` in
    `out`. Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import plotly.graph_objects as go

    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    fracs = [float(k) for k in res["auc"]]

    def save(fig_mpl: Any, fig_go: Any, name: str) -> None:
        fig_mpl.tight_layout()
        fig_mpl.savefig(out / f"{name}.png", dpi=110)
        plt.close(fig_mpl)
        fig_go.write_html(out / f"{name}.html", include_plotlyjs="cdn")
        written.extend([out / f"{name}.png", out / f"{name}.html"])

    # failure prediction AUC vs elapsed reasoning
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    fg = go.Figure()
    for key, name in (("auc", "tortuosity alone"), ("auc_classifier", "dynamics classifier")):
        y = [np.nan if v is None else v for v in res[key].values()]
        ci = [c or [np.nan, np.nan] for c in res[key + "_ci"].values()]
        ax.plot(fracs, y, marker="o", label=name)
        ax.fill_between(fracs, [c[0] for c in ci], [c[1] for c in ci], alpha=0.2)
        fg.add_scatter(x=fracs, y=y, mode="lines+markers", name=name)
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.axhline(0.69, color="tab:red", lw=0.8, ls="--", label="paper: 0.69 at 30%")
    ax.set(xlabel="elapsed reasoning (share of spans)", ylabel="failure AUC", ylim=(0.3, 1.0))
    ax.legend(fontsize=8)
    fg.update_layout(xaxis_title="elapsed reasoning", yaxis_title="failure AUC", yaxis_range=[0.3, 1.0])
    save(fig, fg, "auc_by_elapsed")

    # per-step fidelity R^2 vs elapsed reasoning
    curve = res["fidelity_r2_by_elapsed"]
    bins = np.arange(len(curve["correct"])) / len(curve["correct"]) + 0.05
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    fg = go.Figure()
    for name in ("correct", "failed"):
        y = [np.nan if v is None else v for v in curve[name]]
        ax.plot(bins, y, marker="o", label=name)
        fg.add_scatter(x=bins, y=y, mode="lines+markers", name=name)
    ax.set(xlabel="elapsed reasoning", ylabel="per-step fidelity R^2")
    ax.legend(fontsize=8)
    fg.update_layout(xaxis_title="elapsed reasoning", yaxis_title="per-step fidelity R^2")
    save(fig, fg, "fidelity_by_elapsed")

    # path length and tortuosity, correct vs failed (needs the per-trace rows, absent from a summary)
    rows = res.get("traces")
    if not rows:
        return written
    fig, axes = plt.subplots(1, 2, figsize=(7.5, 3.4))
    fg = go.Figure()
    for ax, stat in zip(axes, ("path_length", "tortuosity")):
        groups = [[r[stat] for r in rows if r["correct"] == ok and r[stat] is not None] for ok in (True, False)]
        ax.boxplot(groups, showfliers=False)
        ax.set_xticks([1, 2], ["correct", "failed"])
        ax.set_title(stat.replace("_", " "))
        for ok, g in zip(("correct", "failed"), groups):
            fg.add_box(y=g, name=f"{stat} ({ok})")
    save(fig, fg, "path_shape")
    return written
