"""Reasoning dynamics on held-out traces: does the attribution stream tell failures apart?

The vSTREAM paper's second claim: successful chains have shorter, straighter reliance paths,
failures split into Fixation (hallucination) and Wandering (reasoning error), and the path's
shape predicts failure before reasoning ends. This module measures that on our own traces:

* `trace_dynamics` generates a trace with attention capture, scores every thinking span with
  the estimator (as the live worker does) and keeps the per-span region-effect vectors;
* `prefix_features` turns the first share of a trace's spans into dynamics features (path
  length, tortuosity, concentration, switching), as they would be known live at that point;
* `vstream.attr.risk.RiskModel` is fitted here on validation traces (`fit_risk_model`);
* `analyze` compares correct and failed held-out traces (rank tests, AUC with bootstrap
  intervals at 10% .. 100% elapsed, per-step fidelity R^2, label vs failure type).
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from vstream.attr.ablation import PlaceholderInTrace, ablation_effects
from vstream.attr.dynamics import DynamicsTracker, PathPoint
from vstream.attr.estimator import Estimator
from vstream.attr.features import variant_of
from vstream.attr.labels import draw_masks, thought_spans, trace_with_capture
from vstream.attr.methods import AttributionContext, attribute
from vstream.attr.regions import regions_for
from vstream.attr.risk import FEATURES, RiskModel, point_features
from vstream.attr.userdata import DataRow
from vstream.model import VLM, VLMError, normalize_answer
from vstream.world.eval_model import parse_answer
from vstream.world.shapes import Scene

FRACTIONS = tuple(round(0.1 * i, 1) for i in range(1, 11))
MIN_TIMED_SPANS = 8  # AUC by elapsed reasoning: only traces long enough for "30% elapsed" to hide the end
HALLUCINATION_FAMILIES = ("existence",)  # hallucination probes: a failure there is a hallucination


@dataclass
class TraceDynamics:
    """One generated trace: its outcome and its per-span region-effect vectors."""

    seed: int
    family: str
    kind: str
    question: str
    answer: str
    predicted: str
    scores: np.ndarray  # (S, K) predicted region effects per thinking span
    fidelity_r2: list[float] = field(default_factory=list)  # per span, when measured

    @functools.cached_property
    def points(self) -> list[PathPoint]:
        """The live tracker's point after each span (point m = the path of the first m+1 spans)."""
        tracker = DynamicsTracker()
        return [tracker.add(s) for s in self.scores]

    @property
    def correct(self) -> bool:
        return self.predicted == self.answer

    @property
    def outcome(self) -> str:
        """correct, hallucination (a failed probe) or reasoning (any other failure)."""
        if self.correct:
            return "correct"
        return "hallucination" if self.family in HALLUCINATION_FAMILIES else "reasoning"


def trace_dynamics(
    vlm: VLM,
    estimator: Estimator,
    scene: Scene | DataRow,
    max_new_tokens: int = 192,
    fidelity_masks: int = 0,
    mask_seed: int = 0,
) -> TraceDynamics | None:
    """Generate, attribute every thinking span; None when the trace has fewer than 2 spans.
    With `fidelity_masks`, also measure each span's effects under that many random region
    ablations and keep the squared correlation with the estimator's predictions (per-step R^2)."""
    inputs = vlm.build_inputs(scene.question, image=scene.image())
    weighting = variant_of(estimator).values  # value norms the estimator's features need, if any
    trace = trace_with_capture(vlm, inputs, max_new_tokens, [weighting] if weighting else [])
    tokens, rows = trace.tokens, trace.rows
    if not tokens:
        return None
    spans, text = thought_spans(vlm, tokens)
    if len(spans) < 2:
        return None
    regions = regions_for(inputs)
    gen = torch.tensor(tokens, dtype=torch.long)
    weights = trace.value_weights
    ctx = AttributionContext(
        vlm, inputs, gen, spans, regions.assignment, token_attn=rows, estimator=estimator, value_weights=weights
    )
    scores = attribute("vstream", ctx)
    answer = normalize_answer(scene.answer or "")
    kind = getattr(scene, "kind", "")  # a user's row has no question variant
    out = TraceDynamics(scene.seed, scene.family, kind, scene.question, answer, parse_answer(text), scores)
    if fidelity_masks:
        ablated = draw_masks(regions.k, fidelity_masks, 0.5, mask_seed, scene.seed)
        try:
            actual = ablation_effects(vlm, inputs, gen, spans, ablated, regions.assignment).numpy()
        except PlaceholderInTrace:
            return out
        pred = ablated.numpy().astype(np.float64) @ scores.T  # (M, S)
        out.fidelity_r2 = [_r2(pred[:, s], actual[:, s]) for s in range(len(spans))]
    return out


def _r2(p: np.ndarray, a: np.ndarray) -> float:
    p, a = p - p.mean(), a - a.mean()
    den = math.sqrt(float((p * p).sum() * (a * a).sum()))
    return float((p * a).sum() / den) ** 2 if den > 0 else 0.0


# ----------------------------------------------------------------------------------------------
# features of a trace prefix


def prefix_length(n: int, fraction: float) -> int:
    """Spans seen after `fraction` of an n-span trace (at least two, for a path to have a shape)."""
    return min(n, max(2, math.ceil(fraction * n - 1e-9)))


def prefix_points(scores: np.ndarray, fraction: float) -> list[PathPoint]:
    """The live tracker's points after the first `fraction` of the spans."""
    tracker = DynamicsTracker()
    return [tracker.add(s) for s in scores[: prefix_length(len(scores), fraction)]]


def fit_risk_model(traces: Sequence[TraceDynamics], fractions: Sequence[float] = FRACTIONS) -> RiskModel:
    """Fit on every (trace, fraction) prefix, so one model serves any point of a live trace."""
    x = np.concatenate([feature_matrix(traces, f) for f in fractions])
    return RiskModel.fit(x, np.tile([not t.correct for t in traces], len(fractions)))


def prefix_features(scores: np.ndarray, fraction: float) -> dict[str, float]:
    return point_features(prefix_points(scores, fraction), scores)


def feature_matrix(traces: Sequence[TraceDynamics], fraction: float) -> np.ndarray:
    """(traces, FEATURES) at `fraction` elapsed."""
    rows = []
    for t in traces:
        feats = point_features(t.points[: prefix_length(len(t.scores), fraction)], t.scores)
        rows.append([feats[f] for f in FEATURES])
    return np.array(rows).reshape(len(rows), len(FEATURES))


# ----------------------------------------------------------------------------------------------
# statistics


def auc_with_ci(
    failed: np.ndarray, score: np.ndarray, n_boot: int = 1000, seed: int = 0
) -> tuple[float | None, list[float] | None]:
    """ROC AUC of `score` for `failed`, with a 95% percentile bootstrap interval."""
    y, s = np.asarray(failed, dtype=bool), np.asarray(score, dtype=np.float64)
    if y.all() or not y.any():
        return None, None
    auc = rank_auc(y, s)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        i = rng.integers(0, len(y), len(y))
        if y[i].all() or not y[i].any():
            continue
        boots.append(rank_auc(y[i], s[i]))
    return round(auc, 4), [round(float(np.percentile(boots, 2.5)), 4), round(float(np.percentile(boots, 97.5)), 4)]


def rank_auc(y: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC as the Mann-Whitney statistic (ties count half), the same value as scikit-learn's
    `roc_auc_score`, without its per-call validation cost (the bootstrap calls this thousands of times)."""
    from scipy.stats import rankdata

    ranks = rankdata(score)
    n1 = int(y.sum())
    n0 = len(y) - n1
    return float((ranks[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def within_family_auc(traces: Sequence[TraceDynamics], failed: np.ndarray, score: np.ndarray) -> float | None:
    """Tortuosity's AUC inside each family with both outcomes, averaged weighted by traces."""
    total, weight = 0.0, 0
    for fam in sorted({t.family for t in traces}):
        idx = np.array([t.family == fam for t in traces])
        y = failed[idx]
        if y.sum() < 5 or (~y).sum() < 5:
            continue
        total += rank_auc(y, score[idx]) * int(idx.sum())
        weight += int(idx.sum())
    return round(total / weight, 4) if weight else None


def rank_test(correct: np.ndarray, failed: np.ndarray) -> dict[str, Any]:
    """Two-sided Mann-Whitney U: do correct and failed traces differ in this statistic?"""
    from scipy.stats import mannwhitneyu

    c, f = np.asarray(correct, dtype=np.float64), np.asarray(failed, dtype=np.float64)
    if not len(c) or not len(f):
        return {"p_value": None}
    res = mannwhitneyu(c, f, alternative="two-sided")
    return {
        "p_value": float(res.pvalue),
        "mean_correct": round(float(c.mean()), 6),
        "mean_failed": round(float(f.mean()), 6),
        "median_correct": round(float(np.median(c)), 6),
        "median_failed": round(float(np.median(f)), 6),
    }


def fidelity_curve(traces: Sequence[TraceDynamics], bins: int = 10) -> dict[str, list[float | None]]:
    """Mean per-step R^2 by elapsed fraction (span midpoint / spans), correct vs failed."""
    out: dict[str, list[float | None]] = {}
    for name, keep in (("correct", True), ("failed", False)):
        sums, counts = np.zeros(bins), np.zeros(bins)
        for t in traces:
            if t.correct != keep or not t.fidelity_r2:
                continue
            n = len(t.fidelity_r2)
            for s, r2 in enumerate(t.fidelity_r2):
                b = min(bins - 1, int((s + 0.5) / n * bins))
                sums[b] += r2
                counts[b] += 1
        out[name] = [round(float(a / c), 4) if c else None for a, c in zip(sums, counts)]
    return out


def trace_row(t: TraceDynamics) -> dict[str, Any]:
    """One trace's line in the report: outcome and the shape of its whole reliance path."""
    points = t.points
    last = points[-1]
    return {
        "seed": t.seed,
        "family": t.family,
        "correct": t.correct,
        "outcome": t.outcome,
        "spans": len(t.scores),
        "path_length": round(float(last.path_length), 6),
        "tortuosity": None if last.tortuosity is None else round(float(last.tortuosity), 4),
        "concentration": round(float(np.mean([p.concentration for p in points])), 4),
        "label": last.label,
    }


def analyze(
    heldout: Sequence[TraceDynamics], fit_on: Sequence[TraceDynamics], n_boot: int = 1000
) -> tuple[dict[str, Any], RiskModel]:
    """The paper's analysis on `heldout` traces; the risk model is fitted on `fit_on` (another split)."""
    failed = np.array([not t.correct for t in heldout])
    risk = fit_risk_model(fit_on)
    full = {f: feature_matrix(heldout, 1.0)[:, i] for i, f in enumerate(FEATURES)}
    tort_full = np.exp(full["log_tortuosity"])
    # By elapsed reasoning: long traces only (a 2-step trace shows its whole path at any share),
    # pooled, and within each family (so a family's difficulty and length cannot carry the AUC).
    timed = [t for t in heldout if len(t.scores) >= MIN_TIMED_SPANS]
    t_failed = np.array([not t.correct for t in timed], dtype=bool)
    tort_i = FEATURES.index("log_tortuosity")
    auc, auc_ci, auc_clf, auc_clf_ci, auc_fam = {}, {}, {}, {}, {}
    for frac in FRACTIONS:
        x = feature_matrix(timed, frac) if timed else np.zeros((0, len(FEATURES)))
        key = f"{frac:.1f}"
        auc[key], auc_ci[key] = auc_with_ci(t_failed, x[:, tort_i], n_boot)
        auc_clf[key], auc_clf_ci[key] = auc_with_ci(t_failed, risk.probability(x) if len(x) else x[:, 0], n_boot)
        auc_fam[key] = within_family_auc(timed, t_failed, x[:, tort_i])
    risk.heldout_auc = {"0.3": auc_clf["0.3"], "1.0": auc_clf["1.0"], "n": len(timed)}

    outcomes = ("correct", "hallucination", "reasoning")
    labels = ("Fixation", "Wandering", "stable")
    table = {lab: dict.fromkeys(outcomes, 0) for lab in labels}
    for t in heldout:
        table[t.points[-1].label][t.outcome] += 1
    by_family: dict[str, list[bool]] = {}
    for t in heldout:
        by_family.setdefault(t.family, []).append(t.correct)
    res = {
        "n": len(heldout),
        "n_correct": int((~failed).sum()),
        "n_failed": int(failed.sum()),
        "n_fit": len(fit_on),
        "accuracy_per_family": {f: round(float(np.mean(v)), 4) for f, v in sorted(by_family.items())},
        "p_value": {
            "path_length": rank_test(full["path_length"][~failed], full["path_length"][failed]),
            "tortuosity": rank_test(tort_full[~failed], tort_full[failed]),
        },
        "auc": auc,
        "auc_ci": auc_ci,
        "auc_classifier": auc_clf,
        "auc_classifier_ci": auc_clf_ci,
        "auc_within_family": auc_fam,
        "n_timed": len(timed),
        "n_timed_failed": int(t_failed.sum()),
        "min_timed_spans": MIN_TIMED_SPANS,
        "label_vs_failure": table,
        "fidelity_r2_by_elapsed": fidelity_curve(heldout),
        "n_fidelity_traces": sum(1 for t in heldout if t.fidelity_r2),
        "traces": [trace_row(t) for t in heldout],
    }
    return res, risk


def collect_dynamics(
    vlm: VLM,
    estimator: Estimator,
    items: Sequence[Scene | DataRow],
    max_new_tokens: int = 192,
    fidelity_first: int = 0,
    fidelity_masks: int = 16,
    progress: bool = True,
    desc: str = "traces",
    on_trace: Callable[[TraceDynamics], None] | None = None,
) -> tuple[list[TraceDynamics], int]:
    """`trace_dynamics` over `items` (per-step fidelity on the first `fidelity_first`); returns
    the traces and how many were skipped: fewer than two thinking spans, or (a user's row) an
    image that cannot be used."""
    out, skipped = [], 0
    for i, scene in enumerate(tqdm(items, desc=desc, file=sys.stderr, disable=not progress)):
        try:
            t = trace_dynamics(vlm, estimator, scene, max_new_tokens, fidelity_masks if i < fidelity_first else 0)
        except VLMError:
            if isinstance(scene, Scene):
                raise
            t = None
        if t is None:
            skipped += 1
            continue
        out.append(t)
        if on_trace is not None:
            on_trace(t)
    return out, skipped
