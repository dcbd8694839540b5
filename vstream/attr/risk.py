"""Failure risk from reasoning dynamics: features of a reliance path so far, and a small
logistic regression over them that the live worker applies after every span.

The model is fitted by `vstream.attr.analysis` on validation traces and stored as JSON
(coefficients and scaling only, nothing executable), beside its held-out AUC.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vstream.attr.dynamics import PathPoint
from vstream.model import VLMError

FEATURES = (
    "path_length",
    "log_tortuosity",
    "concentration_mean",
    "concentration_std",
    "switch_rate",
    "effect_mass",
)


def point_features(points: Sequence[PathPoint], scores: np.ndarray) -> dict[str, float]:
    """Dynamics features as known at the last of `points` (what the live readout sees)."""
    last = points[-1]
    conc = np.array([p.concentration for p in points])
    tops = [int(np.argmax(s)) for s in scores[: len(points)]]
    switches = sum(a != b for a, b in zip(tops, tops[1:])) / max(1, len(tops) - 1)
    tort = last.tortuosity if last.tortuosity is not None else 1.0
    mass = float(np.mean([np.maximum(s, 0).sum() for s in scores[: len(points)]]))
    return {
        "path_length": float(last.path_length),
        "log_tortuosity": float(np.log(max(tort, 1.0))),
        "concentration_mean": float(conc.mean()),
        "concentration_std": float(conc.std()),
        "switch_rate": float(switches),
        "effect_mass": mass,
    }


@dataclass
class RiskModel:
    """Logistic regression over standardised dynamics features -> P(failure). JSON, no pickle."""

    mean: np.ndarray
    std: np.ndarray
    coef: np.ndarray
    intercept: float
    heldout_auc: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def fit(cls, x: np.ndarray, failed: np.ndarray) -> RiskModel:
        """Fit on (samples, FEATURES) rows and whether each sample's trace failed."""
        from sklearn.linear_model import LogisticRegression

        y = np.asarray(failed, dtype=bool)
        if len(set(y.tolist())) < 2:
            raise VLMError("the risk model needs both correct and failed traces to fit")
        mean, std = x.mean(0), x.std(0) + 1e-9
        lr = LogisticRegression(C=1.0, class_weight="balanced", max_iter=1000).fit((x - mean) / std, y)
        return cls(mean, std, lr.coef_[0], float(lr.intercept_[0]))

    def probability(self, features: dict[str, float] | np.ndarray) -> np.ndarray:
        x = np.array([features[f] for f in FEATURES]) if isinstance(features, dict) else np.asarray(features)
        z = ((x - self.mean) / self.std) @ self.coef + self.intercept
        return 1.0 / (1.0 + np.exp(-z))

    def to_json(self) -> dict[str, Any]:
        return {
            "features": list(FEATURES),
            "mean": self.mean.tolist(),
            "std": self.std.tolist(),
            "coef": self.coef.tolist(),
            "intercept": self.intercept,
            "heldout_auc": self.heldout_auc,
        }

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1))

    @classmethod
    def load(cls, path: Path) -> RiskModel:
        try:
            d = json.loads(Path(path).read_text())
            if d["features"] != list(FEATURES):
                raise VLMError(f"{path} was fitted on other features: {d['features']}")
            return cls(
                np.array(d["mean"]), np.array(d["std"]), np.array(d["coef"]), float(d["intercept"]), d["heldout_auc"]
            )
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise VLMError(f"cannot read the risk model {path}: {e}") from e
