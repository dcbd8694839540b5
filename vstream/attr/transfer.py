"""How far an estimator carries: across task families, with more labels, over other regions.

The paper reports in-domain LDS 0.70-0.74, 75-90% of it kept when an estimator trained on one
task is applied to another (a mixture recovers all), LDS plateauing near 2,000 training
examples, and semantic regions well ahead of random blocks (~0.3) and Voronoi cells (~0.45).
Everything here is computed from collected label folders: estimators are fitted on training
labels and scored on held-out labels only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from vstream.attr.estimator import evaluate, train
from vstream.attr.labels import LabeledExample

SIZES = (125, 250, 500, 1000, 2000, 4000)


def _fit(examples: Sequence[LabeledExample], epochs: int, seed: int = 0):
    return train(list(examples), epochs=epochs, seed=seed, progress=False)[0]


def _lds(est, examples: Sequence[LabeledExample]) -> float | None:
    return round(float(evaluate(est, examples)["lds"]), 4) if examples else None


def family_matrix(
    train_ex: Sequence[LabeledExample], held_ex: Sequence[LabeledExample], epochs: int = 100, min_examples: int = 20
) -> dict[str, Any]:
    """LDS of an estimator fitted on each family's labels (and on all: "mixture"), on each
    family's held-out labels; `kept` = share of the in-domain LDS that transfers."""
    fams = sorted({e.family for e in train_ex} & {e.family for e in held_ex})
    by = lambda exs, f: [e for e in exs if e.family == f]  # noqa: E731
    trained = [f for f in fams if len(by(train_ex, f)) >= min_examples]
    lds: dict[str, dict[str, float | None]] = {}
    for f in [*trained, "mixture"]:
        est = _fit(train_ex if f == "mixture" else by(train_ex, f), epochs)
        lds[f] = {g: _lds(est, by(held_ex, g)) for g in fams}
        lds[f]["all"] = _lds(est, held_ex)
    lds["raw_attention"] = {g: _lds(None, by(held_ex, g)) for g in fams} | {"all": _lds(None, held_ex)}
    kept = {
        f: {g: round(lds[f][g] / lds[g][g], 3) if lds[g][g] and lds[f][g] is not None else None for g in trained}
        for f in [*trained, "mixture"]
    }
    off = [kept[f][g] for f in trained for g in trained if f != g and kept[f][g] is not None]
    return {
        "lds": lds,
        "kept": kept,
        "kept_off_diagonal_mean": round(float(np.mean(off)), 3) if off else None,
        "train_examples": {f: len(by(train_ex, f)) for f in fams} | {"mixture": len(train_ex)},
        "heldout_examples": {g: len(by(held_ex, g)) for g in fams},
    }


def size_curve(
    train_ex: Sequence[LabeledExample],
    held_ex: Sequence[LabeledExample],
    sizes: Sequence[int] = SIZES,
    epochs: int = 100,
    seed: int = 0,
) -> dict[str, Any]:
    """Held-out LDS of estimators fitted on random subsets of growing size (and on all labels)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(train_ex))
    use = sorted({min(int(s), len(train_ex)) for s in sizes if s < len(train_ex)} | {len(train_ex)})
    lds = {str(n): _lds(_fit([train_ex[i] for i in order[:n]], epochs, seed), held_ex) for n in use}
    return {"lds": lds, "raw_attention": _lds(None, held_ex), "heldout_examples": len(held_ex)}


def region_methods(
    sets: dict[str, tuple[Sequence[LabeledExample], Sequence[LabeledExample]]], epochs: int = 100
) -> dict[str, Any]:
    """Per region method (name -> (train labels, held-out labels)), the held-out LDS of an
    estimator fitted on the same number of training examples (the smallest set's)."""
    budget = min(len(tr) for tr, _ in sets.values())
    out: dict[str, Any] = {"train_examples_each": budget}
    for name, (tr, held) in sets.items():
        out[name] = {
            "lds": _lds(_fit(list(tr)[:budget], epochs), held),
            "raw_attention": _lds(None, held),
            "heldout_examples": len(held),
        }
    return out
