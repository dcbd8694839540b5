"""Estimator variant study: each variant trained on training labels, scored on validation labels.

Every variant is scored with `evaluate`'s LDS on validation scenes, so that a design is chosen
without looking at held-out scenes (issue 23, "close the gap to occlusion").

    python -m vstream estimator-variants --train runs/labels-variants --val runs/labels-val --json

A variant is named by "+"-joined tokens in any order; "base" (no token) is the estimator
`train-estimator` fits by default:

* feature tokens (`vstream.attr.features`): vnorm, vonorm, tnorm, mean, max, last, rmean, log.
  Both label folders must hold the pooled part (`collect --features` stores several variants
  from one trace); rmean and log are derived from a stored variant.
* training tokens (`vstream.attr.estimator.train`): mse, huber (the loss; default Pearson);
  wd<x> (AdamW weight decay, e.g. wd0, wd1e-2; default 1e-4); nobias (no region bias); zscore
  (standardised features); balance (every scene family weighs the same in the loss);
  L<a>-<b> (only layers a..b), early / late (first / second half of the
  layers), top<N> (the N columns that correlate best with the effects on the training labels).
* label tokens: @<name> trains on the folder given as `train_sets[name]` (label design: e.g.
  collected with `--masks 64` or `--keep-prob 0.7`), validated on the same validation labels.

Scores, per validation span (`validation_scores`): region scores = the estimator's prediction
on the span's features; predicted subset effect = their sum over each mask's ablated regions;
then `evaluate.subset_predictions` and `evaluate.span_scores`, the functions `evaluate` uses. So
`lds` is evaluate's LDS, `r2` its r2 (mean over spans of squared Pearson), measured on validation
scenes instead of fresh held-out ones; it is the same number as long as the validation labels
were collected the way evaluate measures (32 masks, keep probability 0.5; the report says so in
`val_design_matches_evaluate`). `r2_calibrated`: 1 - SSE/SST of the calibrated predictions in
nats over the non-constant spans. Raw attention (default features summed) is a reference row.

Refused: validation labels of the held-out split, training labels of the held-out split, and
validation scenes that any training label set also holds (by scene seed).
"""

from __future__ import annotations

import re
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vstream.attr import features as FV
from vstream.attr.estimator import LinearEstimator, check_options, check_variant, in_ranges, r2_score, train
from vstream.attr.evaluate import DEFINITIONS, KEEP_PROB, N_MASKS, constant_spans, span_scores, subset_predictions
from vstream.attr.labels import LabeledExample, derivation, folder_config, load_labels
from vstream.model import VLMError

__all__ = [
    "TRAINING_TOKENS",
    "Variant",
    "default_variants",
    "markdown",
    "parse_variant",
    "run_study",
    "validation_scores",
]

BASE = "base"
DEFAULT_WEIGHT_DECAY = 1e-4  # train()'s default
TRAINING_TOKENS = (
    "mse",
    "huber",
    "wd<x>",
    "nobias",
    "zscore",
    "balance",
    "L<a>-<b>",
    "early",
    "late",
    "top<N>",
    "@<set>",
)
LabelDirs = Sequence[str | Path]


@dataclass(frozen=True)
class Variant:
    """One row of the study: which labels, which features, which training options."""

    name: str
    features: FV.FeatureVariant = field(default_factory=FV.FeatureVariant)
    label_set: str = ""  # "" = the main training labels
    loss: str = "pearson"
    weight_decay: float = DEFAULT_WEIGHT_DECAY
    region_bias: bool = True
    scaling: str = "rms"
    columns: str = "all"  # an estimator column rule, or "early" / "late" (resolved by layer count)
    balance: bool = False  # every scene family weighs the same in the loss

    def resolved_columns(self, num_layers: int) -> str:
        half = num_layers // 2
        if self.columns == "early":
            return f"layers=0-{max(half, 1) - 1}"
        if self.columns == "late":
            return f"layers={min(half, num_layers - 1)}-{num_layers - 1}"
        return self.columns

    def train_options(self, num_layers: int) -> dict[str, Any]:
        return {
            "loss": self.loss,
            "weight_decay": self.weight_decay,
            "region_bias": self.region_bias,
            "scaling": self.scaling,
            "columns": self.resolved_columns(num_layers),
            "feature_variant": self.features.name,
            "balance": self.balance,
        }

    def flags(self, num_layers: int) -> str:
        """The `train-estimator` options that train this variant (on its label folder)."""
        out = [] if self.features.is_default else [f"--features {self.features.name}"]
        out += [] if self.loss == "pearson" else [f"--loss {self.loss}"]
        out += [] if self.weight_decay == DEFAULT_WEIGHT_DECAY else [f"--weight-decay {self.weight_decay:g}"]
        out += [] if self.region_bias else ["--no-region-bias"]
        out += [] if self.scaling == "rms" else [f"--scaling {self.scaling}"]
        cols = self.resolved_columns(num_layers)
        out += [] if cols == "all" else [f"--columns {cols}"]
        out += ["--balance-families"] if self.balance else []
        return " ".join(out)


def parse_variant(name: str) -> Variant:
    """A variant from its name (module doc); ValueError for an unknown token."""
    feature_tokens: list[str] = []
    kw: dict[str, Any] = {}
    for tok in [t.strip() for t in name.split("+") if t.strip()]:
        if tok == BASE:
            continue
        if FV.is_feature_token(tok):
            feature_tokens.append(tok)
        elif tok in ("mse", "huber"):
            kw["loss"] = tok
        elif tok == "nobias":
            kw["region_bias"] = False
        elif tok == "zscore":
            kw["scaling"] = "zscore"
        elif tok == "balance":
            kw["balance"] = True
        elif tok in ("early", "late"):
            kw["columns"] = tok
        elif m := re.fullmatch(r"wd([0-9.eE+-]+)", tok):
            kw["weight_decay"] = float(m.group(1))
        elif m := re.fullmatch(r"L(\d+)(?:-(\d+))?", tok):
            kw["columns"] = f"layers={m.group(1)}-{m.group(2) or m.group(1)}"
        elif m := re.fullmatch(r"top(\d+)", tok):
            kw["columns"] = f"top={m.group(1)}"
        elif m := re.fullmatch(r"@([A-Za-z0-9_.-]+)", tok):
            kw["label_set"] = m.group(1)
        else:
            raise ValueError(
                f"unknown token {tok!r} in variant {name!r}; feature tokens: {', '.join(FV.TOKENS)}; "
                f"training tokens: {', '.join(TRAINING_TOKENS)}"
            )
    return Variant(name=name, features=FV.parse("+".join(feature_tokens)), **kw)


def default_variants(stored: Sequence[str], num_layers: int, num_heads: int, sets: Sequence[str] = ()) -> list[str]:
    """Every single change from base: each feature variant `stored` (in both label folders), the
    per-region tokens derived from the default, each training option, each extra label set."""
    out = [BASE]
    out += [v for v in FV.names(stored) if v != FV.DEFAULT]
    if FV.DEFAULT in FV.names(stored):
        out += ["rmean", "log", "rmean+log"]
    out += ["mse", "huber", "wd0", "wd1e-3", "wd1e-2", "wd1e-1", "nobias", "zscore", "balance"]
    if num_layers > 1:
        out += ["early", "late"]
    if num_layers * num_heads > 2:
        out.append(f"top{num_layers * num_heads // 2}")
    out += [f"@{s}" for s in sets]
    return out


# ----------------------------------------------------------------------------------------------
# scoring


def validation_scores(estimator: LinearEstimator | None, examples: Sequence[LabeledExample]) -> dict[str, Any]:
    """LDS / R^2 on labelled examples the way `evaluate` computes them (module doc); with None,
    raw attention (the features summed over layers and heads). An estimator refuses examples of
    another feature variant."""
    if estimator is not None:
        check_variant(estimator, examples)
    lds: list[float] = []
    r2: list[float] = []
    fam: dict[str, list[float]] = defaultdict(list)
    cal_p: list[np.ndarray] = []
    cal_a: list[np.ndarray] = []
    n_spans = n_const = 0
    for e in examples:
        f = e.features.float()  # (S, K, L*H)
        with torch.no_grad():
            scores = (estimator.predict(f) if estimator is not None else f.sum(-1)).detach().float().cpu().numpy()
        pred = subset_predictions(scores, e.masks.numpy())  # (M, S)
        actual = e.effects.double().numpy()  # (M, S)
        l_, r_, c_ = span_scores(pred, actual)
        lds += l_
        r2 += r_
        fam[e.family] += l_
        n_spans += int(actual.shape[1])
        n_const += c_
        if estimator is not None:
            live = ~constant_spans(actual)
            cal_p.append((pred + float(estimator.bias.detach()))[:, live].ravel())
            cal_a.append(actual[:, live].ravel())
    mean = lambda xs: round(float(np.mean(xs)), 4) if len(xs) else None
    out: dict[str, Any] = {
        "lds": mean(lds),
        "r2": mean(r2),
        "spans": n_spans,
        "spans_scored": len(lds),
        "spans_constant": n_const,
        "lds_per_family": {k: mean(v) for k, v in sorted(fam.items())},
    }
    if estimator is not None:
        got = r2_score(cal_p, cal_a) if cal_p and sum(a.size for a in cal_a) else float("nan")
        out["r2_calibrated"] = round(got, 4) if np.isfinite(got) else None
    return out


# ----------------------------------------------------------------------------------------------
# the study


def _check_split(cfg: dict[str, Any], what: str, where: LabelDirs) -> None:
    if cfg.get("split") == "heldout":
        raise VLMError(
            f"{what} labels {', '.join(map(str, where))} are from the held-out split: the study chooses on "
            "validation scenes only (collect --split val)"
        )


def run_study(
    train_dirs: LabelDirs,
    val_dirs: LabelDirs,
    variants: Sequence[str] | None = None,
    train_sets: dict[str, LabelDirs] | None = None,
    epochs: int = 200,
    lr: float = 0.02,
    val_fraction: float = 0.1,
    seed: int = 0,
    save_dir: str | Path | None = None,
    log: Any = sys.stderr,
) -> dict[str, Any]:
    """Train every variant (default: `default_variants`) and score it on the validation labels;
    see the module doc. `save_dir`: also save each variant's estimator there. Returns the
    report: `rows` (one per variant, in order, then raw attention), `best` (highest val LDS)."""
    sets: dict[str, list[str]] = {"": [str(d) for d in train_dirs]}
    for k, v in (train_sets or {}).items():
        sets[k] = [str(d) for d in v]
    val_list = [str(d) for d in val_dirs]
    cfgs = {k: folder_config(v) for k, v in sets.items()}
    val_cfg = folder_config(val_list)
    for k, cfg in cfgs.items():
        _check_split(cfg, "training" if not k else f"training set @{k}", sets[k])
    _check_split(val_cfg, "validation", val_list)
    main = cfgs[""]
    num_layers, num_heads = int(main["num_layers"]), int(main["num_heads"])
    for k, cfg in cfgs.items():
        if (cfg.get("model"), cfg.get("num_layers"), cfg.get("num_heads")) != (
            val_cfg.get("model"),
            val_cfg.get("num_layers"),
            val_cfg.get("num_heads"),
        ):
            raise VLMError(f"training labels {sets[k]} and validation labels come from different models")
    if variants:
        names = list(variants)
    else:
        stored = [v for v in FV.names(main["feature_variants"]) if v in FV.names(val_cfg["feature_variants"])]
        names = default_variants(stored, num_layers, num_heads, [k for k in sets if k])
    try:
        parsed = [parse_variant(n) for n in names]
    except ValueError as e:
        raise VLMError(str(e)) from e
    for v in parsed:
        if v.label_set not in sets:
            raise VLMError(f"variant {v.name!r} names label set @{v.label_set}, not given (--train-set NAME DIR)")
        opts = v.train_options(num_layers)
        try:  # before the first variant trains: a bad one late in the list would lose the others
            check_options(opts["loss"], opts["scaling"], opts["region_bias"], 0.0, opts["balance"])
            for cfg, where in ((cfgs[v.label_set], "training"), (val_cfg, "validation")):
                derivation([FV.parse(s) for s in cfg["feature_variants"]], v.features, f"the {where} labels")
        except VLMError as e:
            raise VLMError(f"variant {v.name!r}: {e}") from e

    val_cache: dict[str, list[LabeledExample]] = {}

    def val_examples(variant: str) -> list[LabeledExample]:
        if variant not in val_cache:
            val_cache[variant] = load_labels(val_list, variant)[1]
        return val_cache[variant]

    val_default = val_examples(FV.DEFAULT)
    val_seeds = {int(e.seed) for e in val_default}
    design = {"masks_per_example": val_cfg.get("masks_per_example"), "keep_prob": val_cfg.get("keep_prob")}
    rows: list[dict[str, Any]] = []
    t_all = time.perf_counter()
    for i, v in enumerate(parsed):
        t0 = time.perf_counter()
        est, rep = train(
            sets[v.label_set],
            epochs=epochs,
            lr=lr,
            val_fraction=val_fraction,
            seed=seed,
            progress=False,
            **v.train_options(num_layers),
        )
        shared = [s for s in val_seeds if in_ranges(s, est.meta["train_seeds"])]
        if shared:
            raise VLMError(f"{len(shared)} validation scenes are also in the training labels of {v.name!r}")
        scores = validation_scores(est, val_examples(v.features.name))
        row = {
            "variant": v.name,
            "labels": f"@{v.label_set}" if v.label_set else "train",
            "features": v.features.name,
            "training": {k: val for k, val in v.train_options(num_layers).items() if k != "feature_variant"},
            "train_estimator_flags": v.flags(num_layers),
            "val_lds": scores["lds"],
            "val_r2": scores["r2"],
            "val_r2_calibrated": scores["r2_calibrated"],
            "val_lds_per_family": scores["lds_per_family"],
            "val_spans_scored": scores["spans_scored"],
            "train_examples": int(est.meta["trained_examples"]),
            "best_epoch": int(rep["best_epoch"]),
            "seconds": round(time.perf_counter() - t0, 1),
        }
        if save_dir is not None:
            path = Path(save_dir) / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', v.name)}.safetensors"
            est.meta["variant_study"] = {"variant": v.name, "val_lds": scores["lds"], "val_dirs": val_list}
            row["estimator"] = str(est.save(path))
        rows.append(row)
        if log is not None:
            print(f"[{i + 1}/{len(parsed)}] {v.name}: val LDS {row['val_lds']} ({row['seconds']} s)", file=log)
    raw = validation_scores(None, val_default)
    base = next((r["val_lds"] for r in rows if r["variant"] == BASE), None)
    for r in rows:
        r["delta_vs_base"] = round(r["val_lds"] - base, 4) if base is not None and r["val_lds"] is not None else None
    scored = [r for r in rows if r["val_lds"] is not None]
    best = max(scored, key=lambda r: r["val_lds"]) if scored else None
    return {
        "rows": rows,
        "raw_attention": {"val_lds": raw["lds"], "val_r2": raw["r2"], "val_lds_per_family": raw["lds_per_family"]},
        "best": best["variant"] if best else None,
        "base_val_lds": base,
        "train": sets[""],
        "train_sets": {k: v for k, v in sets.items() if k},
        "val": val_list,
        "val_examples": len(val_default),
        "val_spans": raw["spans"],
        "val_spans_scored": raw["spans_scored"],
        "val_split": val_cfg.get("split"),
        "val_design": design,
        "val_design_matches_evaluate": design == {"masks_per_example": N_MASKS, "keep_prob": KEEP_PROB},
        "definitions": {"lds": DEFINITIONS["lds"], "r2": DEFINITIONS["r2"]},
        "epochs": int(epochs),
        "seed": int(seed),
        "seconds": round(time.perf_counter() - t_all, 1),
    }


def markdown(report: dict[str, Any]) -> str:
    """The study as a markdown table: one row per variant, then raw attention."""
    f = lambda v, fmt="{:.3f}": "-" if v is None else fmt.format(v)
    lines = [
        "| variant | labels | features | val LDS | vs base | val R^2 | R^2 (nats) | best epoch "
        "| train-estimator flags |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["rows"]:
        mark = " (best)" if r["variant"] == report["best"] else ""
        lines.append(
            f"| {r['variant']}{mark} | {r['labels']} | {r['features']} | {f(r['val_lds'])} | "
            f"{f(r['delta_vs_base'], '{:+.3f}')} | {f(r['val_r2'])} | {f(r['val_r2_calibrated'])} | "
            f"{r['best_epoch']} | {r['train_estimator_flags'] or '-'} |"
        )
    raw = report["raw_attention"]
    lines.append(f"| raw attention (reference) | - | mean | {f(raw['val_lds'])} | - | {f(raw['val_r2'])} | - | - | - |")
    lines.append(
        f"\n{report['val_examples']} validation scenes ({report['val_split']}), {report['val_spans_scored']} "
        f"scored spans of {report['val_spans']}; masks {report['val_design']['masks_per_example']}, keep "
        f"probability {report['val_design']['keep_prob']}"
        + ("" if report["val_design_matches_evaluate"] else " (not evaluate's 32 / 0.5: LDS not comparable to it)")
    )
    return "\n".join(lines)
