"""Faithfulness of vSTREAM and its baselines on held-out shapes-world scenes.

    python -m vstream evaluate --json          # demo model + shipped estimator, 200 scenes

Scenes come from the HELD-OUT seed range (`shapes.scenes("heldout", start, n)`), starting
at offset 100_000 by default, disjoint from `eval-model` (offsets 0..599) and from anything
trained (the train split). `split="val"` scores validation scenes instead (from offset 0 by
default, the scenes `collect --split val` labels): for choosing settings, such as which
estimator variant reaches the baselines family by family, without looking at held-out scenes.
Per scene, exactly as the estimator's labels are made
(`vstream.attr.labels.trace_with_capture`, `thought_spans`, `draw_masks`): generate the trace
greedily with attention capture, compute regions (`regions_for`), cut the thinking spans, then

* ground truth: 32 random region subsets (each region kept with probability 0.5, seeded by
  (mask seed, scene seed); True = ablated), their measured effects on every span with THE ablation operator
  (`vstream.attr.ablation.ablation_effects`);
* every method's (n_spans, K) scores via `vstream.attr.methods.attribute`, timed.

Metrics (per method; "span" = a thinking span of the generated trace, the answer after
`</think>` excluded, as in the estimator's labels):

* lds: per span, Spearman correlation across the 32 subsets between the predicted subset effect
  (sum of the method's scores over the ABLATED regions) and the measured effect; mean over
  spans. Spans whose measured effects are constant (range < 1e-4 nats: float noise) are
  skipped for every method and counted (`n_spans_constant`); a method whose predictions are
  constant on a span scores 0 there.
* r2: per span, squared Pearson correlation of predicted vs measured subset effects (= R^2 of
  the best affine fit actual ~ a * predicted + b), mean over the same spans. Scale-free, so
  methods in other units (attention mass, gradients) compare fairly with vSTREAM's nats.
  `r2_calibrated_vstream`: plain 1 - SSE/SST of the estimator's calibrated predictions (nats,
  bias included), pooled over all (span, subset) pairs.
* top5_drop: per span, measured effect (nats) of ablating the method's 5 top-scored regions
  together (one batched call for all methods); mean over spans. `top5_drop_random`: the same for
  5 random regions, for reference.
* pointing: share of thought spans whose top-scored region overlaps the ground-truth object of
  the matching step (a span matches the scene's next unused step with identical text,
  case-insensitive and stripped; only steps with an object count); overlap = some pixel of
  the region (`Regions.pixel_labels`) lies in the object's mask. `pointing_chance`: mean share
  of regions that overlap the object (what a random region would score).
* seconds_per_span: wall-clock seconds of the method per span (vSTREAM / raw attention include
  pooling the recorded attention rows into features; attention itself was recorded during
  generation at no extra pass), timed on a second call on the same trace right after the
  first: each method's own cost. `seconds_per_span_first_call` times the first call, which
  runs straight after the previous method's (or the ablations') forwards: sub-millisecond
  methods then pay for cold caches and for waking BLAS threads, several times their own cost.
* peak_memory_mb_per_span: the peak extra memory (MB) the method needed while attributing one
  trace (all its spans), median over traces (`vstream.attr.memory.PeakMemory`: on CUDA
  max_memory_allocated above the level before, on the CPU sampled resident memory above the
  level before, coarse). The name keeps the per-span family of keys; the figure is per trace.

Methods: `ALL_METHODS`; the model-internal ones (input_x_gradient, tam, attnlrp: one forward,
and a backward per span for the gradient ones) and occlusion (K forwards) are `SLOW_METHODS`,
which `slow_n` can restrict to the first scenes.

The last stdout line is one JSON object; progress bars go to stderr.
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from vstream.attr.ablation import OPERATOR, PlaceholderInTrace, ablation_effects
from vstream.attr.estimator import Estimator, load
from vstream.attr.estimator import lds as lds_fn
from vstream.attr.features import variant_of
from vstream.attr.labels import draw_masks, thought_spans, trace_with_capture
from vstream.attr.memory import PeakMemory
from vstream.attr.methods import METHODS, AttributionContext, attribute_timed
from vstream.attr.regions import regions_for
from vstream.attr.spans import Span
from vstream.attr.userdata import DataSource
from vstream.model import VLM, VLMError
from vstream.world.assets import DEMO_ESTIMATOR
from vstream.world.shapes import HELDOUT_SEEDS, Scene, scenes

DEFAULT_START = 100_000  # disjoint from eval-model's held-out offsets (0..599)
N_MASKS = 32
KEEP_PROB = 0.5
TOP = 5
CONSTANT_TOL = 1e-4  # nats: a span whose measured subset effects span less is "constant"
DEFAULT_ESTIMATOR = DEMO_ESTIMATOR
ALL_METHODS = ("vstream", "raw_attention", "input_x_gradient", "occlusion", "tam", "attnlrp")
SLOW_METHODS = ("input_x_gradient", "occlusion", "tam", "attnlrp")

DEFINITIONS = {
    "lds": "mean over spans of Spearman(predicted, measured) across 32 random region subsets "
    "(keep prob 0.5); predicted = sum of scores over the ablated regions; constant-effect spans skipped",
    "r2": "mean over the same spans of squared Pearson(predicted, measured) across the subsets "
    "(R^2 of the best affine fit; scale-free)",
    "r2_calibrated_vstream": "1 - SSE/SST of vSTREAM's calibrated subset predictions (scores + bias, nats) "
    "vs measured, pooled over all non-constant (span, subset) pairs",
    "top5_drop": "mean over spans of the measured effect (nats) of ablating the span's 5 top-scored regions",
    "pointing": "share of thought spans matched to a step with an object whose top-scored region "
    "overlaps that object's mask",
    "seconds_per_span": "method wall-clock seconds / spans attributed (a second call on the trace)",
    "seconds_per_span_first_call": "the same for the first call, straight after the previous method's work",
    "peak_memory_mb_per_span": "median over traces of the peak extra memory (MB) while the method attributes "
    "one trace (CUDA: max_memory_allocated above the level before; CPU: sampled RSS above it, coarse)",
    "region_iou_median": "median over the objects the scenes' steps name of the pixel IoU between the "
    "object's mask and its best-overlapping region (at the default K)",
}


# ----------------------------------------------------------------------------------------------
# metrics


def subset_predictions(scores: np.ndarray, ablated: np.ndarray) -> np.ndarray:
    """(S, K) region scores, (M, K) ablated masks -> (M, S) predicted subset effects."""
    return np.asarray(ablated, dtype=np.float64) @ np.asarray(scores, dtype=np.float64).T


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if den > 0 else 0.0


def constant_spans(actual: np.ndarray, tol: float = CONSTANT_TOL) -> np.ndarray:
    """(M, S) measured effects -> (S,) bool: effects vary by less than tol across subsets."""
    a = np.asarray(actual, dtype=np.float64)
    return (a.max(0) - a.min(0)) < tol if a.size else np.zeros(a.shape[1], dtype=bool)


def span_scores(
    predicted: np.ndarray, actual: np.ndarray, tol: float = CONSTANT_TOL
) -> tuple[list[float], list[float], int]:
    """Per-span LDS (Spearman) and R^2 (squared Pearson) across subsets, over non-constant spans.

    predicted, actual: (M, S). Returns (lds list, r2 list, number of constant spans skipped).
    The Spearman part is `vstream.attr.estimator.lds` (the one LDS implementation: average ranks,
    constant predictions score 0), applied to the spans that are not constant within `tol`."""

    p = np.asarray(predicted, dtype=np.float64)
    a = np.asarray(actual, dtype=np.float64)
    const = constant_spans(a, tol)
    keep = np.flatnonzero(~const)
    if keep.size == 0:
        return [], [], int(const.sum())
    _, rho = lds_fn(p[:, keep].T, a[:, keep].T, return_per_span=True)
    r2 = [_pearson(p[:, s], a[:, s]) ** 2 for s in keep]
    ok = np.isfinite(rho)
    return [float(x) for x in rho[ok]], [r for r, o in zip(r2, ok) if o], int(const.sum())


def _pooled_r2(pred: list[np.ndarray], actual: list[np.ndarray]) -> float | None:
    """1 - SSE/SST over all pooled (span, subset) pairs (only meaningful for predictions in nats)."""
    if not pred:
        return None
    p, a = np.concatenate(pred), np.concatenate(actual)
    sst = float(((a - a.mean()) ** 2).sum())
    return round(1 - float(((a - p) ** 2).sum()) / sst, 4) if sst > 0 else None


def top_masks(scores: np.ndarray, top: int = TOP) -> np.ndarray:
    """(S, K) scores -> (S, K) bool: each span's `top` highest-scored regions (stable order)."""
    s = np.asarray(scores, dtype=np.float64)
    out = np.zeros(s.shape, dtype=bool)
    idx = np.argsort(-s, axis=1, kind="stable")[:, : min(top, s.shape[1])]
    np.put_along_axis(out, idx, True, axis=1)
    return out


def best_region_iou(pixel_labels: np.ndarray, mask: np.ndarray) -> float:
    """Pixel IoU between an object's mask and the region that overlaps it best."""
    best = 0.0
    for r in np.unique(pixel_labels[mask]):
        region = pixel_labels == r
        best = max(best, float((region & mask).sum() / (region | mask).sum()))
    return best


def match_steps(spans: list[Span], scene: Scene) -> list[int | None]:
    """For each span, the index of the scene step it states (thought spans only; identical text,
    case-insensitive, stripped; each step used once, in order), else None."""
    norm = lambda x: x.strip().lower()  # noqa: E731
    used: set[int] = set()
    out: list[int | None] = []
    for sp in spans:
        hit = None
        if sp.kind == "thought":
            for j, st in enumerate(scene.steps):
                if j not in used and norm(st.text) == norm(sp.text):
                    hit = j
                    used.add(j)
                    break
        out.append(hit)
    return out


# ----------------------------------------------------------------------------------------------
# the evaluation


def load_estimator(path: str | Path, vlm: VLM) -> Any:

    return load(str(path), vlm)


def evaluate(
    vlm: VLM,
    estimator: Estimator,
    n: int = 200,
    start: int = DEFAULT_START,
    methods: tuple[str, ...] = ALL_METHODS,
    slow_n: int | None = None,
    n_masks: int = N_MASKS,
    keep_prob: float = KEEP_PROB,
    mask_seed: int = 0,
    max_new_tokens: int = 192,
    progress: bool = True,
    data: DataSource | None = None,
    split: str = "heldout",
) -> dict[str, Any]:
    """Run the evaluation on `split` scenes [start, start + n); see the module docstring. With
    `data`, on the user's rows [start, start + n) instead (n None: all); pointing needs reference
    objects, so it is not scored there, and a row whose image cannot be used is counted and skipped.

    `slow_n`: run the SLOW_METHODS (input_x_gradient, occlusion, tam, attnlrp) only on the first
    slow_n scenes (default all)."""

    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    if data is not None:
        items: list[Any] = data.rows[int(start) :] if n is None else data.rows[int(start) : int(start) + int(n)]
        n = len(items)
    else:
        if split not in ("heldout", "val"):
            raise ValueError(f"evaluate scores held-out or validation scenes, not {split!r}")
        items = scenes(split, start, n)
    slow_n = n if slow_n is None else min(int(slow_n), n)
    t_all = time.perf_counter()

    lds: dict[str, list[float]] = defaultdict(list)
    r2: dict[str, list[float]] = defaultdict(list)
    drop: dict[str, list[float]] = defaultdict(list)
    point: dict[str, list[bool]] = defaultdict(list)
    secs: dict[str, float] = defaultdict(float)
    secs_first: dict[str, float] = defaultdict(float)
    peak_mb: dict[str, list[float]] = defaultdict(list)  # per trace
    spans_done: dict[str, int] = defaultdict(int)
    examples_done: dict[str, int] = defaultdict(int)
    drop_random: list[float] = []
    chance: list[float] = []
    cal_p: list[np.ndarray] = []
    cal_a: list[np.ndarray] = []
    fam_lds: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    counts = dict(
        n_spans=0,
        n_spans_matched=0,
        n_pointing_spans=0,
        n_spans_constant=0,
        n_spans_lds=0,
        n_spans_lds_slow=0,
        n_examples_without_spans=0,
        n_examples_unteacherable=0,
        n_examples_bad_image=0,
    )
    ks: list[int] = []
    image_tokens: list[int] = []
    region_iou: list[float] = []
    gen_tokens, gen_secs, gt_secs = 0, 0.0, 0.0

    weighting = variant_of(estimator).values  # value norms the estimator's features need, if any
    values = [weighting] if weighting else []
    for i, scene in enumerate(tqdm(items, desc="evaluate", file=sys.stderr, disable=not progress)):
        try:
            inputs = vlm.build_inputs(scene.question, image=scene.image())
        except VLMError:
            if data is None:
                raise
            counts["n_examples_bad_image"] += 1
            continue
        t0 = time.perf_counter()
        trace = trace_with_capture(vlm, inputs, max_new_tokens, values)  # labels' own generation
        tokens, rows = trace.tokens, trace.rows
        gen_secs += time.perf_counter() - t0
        gen_tokens += len(tokens)
        spans = thought_spans(vlm, tokens)[0] if tokens else []
        if not spans:
            counts["n_examples_without_spans"] += 1
            continue
        gen = torch.tensor(tokens, dtype=torch.long)
        regions = regions_for(inputs)
        k, s_n = regions.k, len(spans)
        ks.append(k)
        image_tokens.append(int(regions.assignment.shape[1]))
        if data is None:  # do regions follow objects? every object a step of the scene names
            size = (scene.image_size, scene.image_size)
            named = sorted({st.obj for st in scene.steps if st.obj is not None})
            region_iou += [best_region_iou(regions.pixel_labels(size), scene.mask(o)) for o in named]
        ctx = AttributionContext(
            vlm,
            inputs,
            gen,
            spans,
            regions.assignment,
            token_attn=rows,
            estimator=estimator,
            regions=regions,
            value_weights=trace.value_weights,
        )

        ablated = draw_masks(k, n_masks, keep_prob, mask_seed, scene.seed).numpy()  # True = ablated
        t0 = time.perf_counter()
        try:
            actual = ablation_effects(
                vlm, inputs, gen, spans, torch.from_numpy(ablated), regions.assignment
            ).numpy()  # (M, S)
        except PlaceholderInTrace:
            counts["n_examples_unteacherable"] += 1
            continue
        gt_secs += time.perf_counter() - t0

        n_const = int(constant_spans(actual).sum())
        run = [m for m in methods if m not in SLOW_METHODS or i < slow_n]
        scores: dict[str, np.ndarray] = {}
        for m in run:
            with PeakMemory(vlm.device) as mem:
                scores[m], dt = attribute_timed(m, ctx)
            secs_first[m] += dt
            secs[m] += attribute_timed(m, ctx)[1]  # the same work again: the method's own cost
            peak_mb[m].append(mem.mb)
            spans_done[m] += s_n
            examples_done[m] += 1
            pred = subset_predictions(scores[m], ablated)
            l_, r_, _ = span_scores(pred, actual)
            if m == "vstream" and hasattr(estimator, "bias"):  # predictions are in nats: plain R^2 too
                live = ~constant_spans(actual)
                cal_p.append((pred + float(torch.as_tensor(estimator.bias).detach()))[:, live].ravel())
                cal_a.append(actual[:, live].ravel())
            lds[m] += l_
            r2[m] += r_
            fam_lds[scene.family][m] += l_
        counts["n_spans"] += s_n
        counts["n_spans_constant"] += n_const
        counts["n_spans_lds"] += s_n - n_const
        if i < slow_n:
            counts["n_spans_lds_slow"] += s_n - n_const

        # top-5 drop: every method's per-span top-5 masks + 5 random regions, one batched call
        rng = np.random.default_rng([mask_seed, scene.seed, 1])
        rand = np.zeros((s_n, k), dtype=bool)
        for s in range(s_n):
            rand[s, rng.choice(k, size=min(TOP, k), replace=False)] = True
        blocks = [top_masks(scores[m]) for m in run] + [rand]
        eff = ablation_effects(
            vlm, inputs, gen, spans, torch.from_numpy(np.concatenate(blocks)), regions.assignment
        ).numpy()
        diag = np.arange(s_n)
        for j, m in enumerate(run):
            drop[m] += eff[j * s_n + diag, diag].tolist()
        drop_random += eff[len(run) * s_n + diag, diag].tolist()

        # pointing
        matched = match_steps(spans, scene)
        labels = None
        for s, j in enumerate(matched):
            if j is None:
                continue
            counts["n_spans_matched"] += 1
            obj = scene.steps[j].obj
            if obj is None:
                continue
            mask = scene.mask(obj)
            if labels is None:
                labels = regions.pixel_labels((mask.shape[1], mask.shape[0]))
            hit = np.zeros(k, dtype=bool)
            hit[np.unique(labels[mask])] = True
            counts["n_pointing_spans"] += 1
            chance.append(float(hit.mean()))
            for m in run:
                point[m].append(bool(hit[int(np.argmax(scores[m][s]))]))

    mean = lambda xs: round(float(np.mean(xs)), 4) if len(xs) else None  # noqa: E731
    res: dict[str, Any] = {
        "lds": {m: mean(lds[m]) for m in methods},
        "r2": {m: mean(r2[m]) for m in methods},
        "r2_calibrated_vstream": _pooled_r2(cal_p, cal_a),
        "lds_per_family": {f: {m: mean(v[m]) for m in methods} for f, v in sorted(fam_lds.items())},
        "top5_drop": {m: mean(drop[m]) for m in methods},
        "top5_drop_random": mean(drop_random),
        "pointing": {m: mean(point[m]) for m in methods},
        "pointing_chance": mean(chance),
        "n": n,
        "n_per_method": {m: examples_done[m] for m in methods},
        **counts,
        "seconds_per_span": {m: (round(secs[m] / spans_done[m], 6) if spans_done[m] else None) for m in methods},
        "seconds_per_span_first_call": {
            m: (round(secs_first[m] / spans_done[m], 6) if spans_done[m] else None) for m in methods
        },
        "peak_memory_mb_per_span": {
            m: (round(float(np.median(peak_mb[m])), 1) if peak_mb[m] else None) for m in methods
        },
        "ground_truth_seconds_per_example": round(gt_secs / max(1, len(ks)), 4),
        "generation_seconds_per_token": round(gen_secs / max(1, gen_tokens), 5),
        "k_mean": round(float(np.mean(ks)), 2) if ks else None,
        "image_tokens_mean": round(float(np.mean(image_tokens)), 2) if image_tokens else None,
        "region_iou_median": round(float(np.median(region_iou)), 4) if region_iou else None,
        "n_region_iou_objects": len(region_iou),
        "split": split if data is None else data.name,
        "start": start,
        "seeds": [HELDOUT_SEEDS[start], HELDOUT_SEEDS[start + n - 1]] if n and data is None else [],
        "masks_per_example": n_masks,
        "keep_prob": keep_prob,
        "mask_seed": mask_seed,
        "slow_methods_on_first": slow_n,
        "ablation": OPERATOR,
        "feature_variant": variant_of(estimator).name,  # what vstream's estimator reads
        "definitions": DEFINITIONS,
        "seconds": round(time.perf_counter() - t_all, 1),
    }
    return res
