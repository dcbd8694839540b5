"""How visual reliance moves over the reasoning steps: a 3-D PCA path and its shape.

Per span we keep the top-32 entries of the predicted region-effect vector (the rest set to 0),
and project the sequence of such vectors to 3-D with PCA. The PCA is *refit* on all spans so
far each time a span closes (a trace has tens of spans, so this costs microseconds), and each
new fit's axes are sign-aligned with the previous fit so the drawn path does not flip around.

Shape statistics, following the vSTREAM analysis:
- path length: sum of distances between consecutive points;
- tortuosity: path length / net displacement (first to last point); None while undefined;
- concentration: share of a span's positive effect mass held by its top region.
A trace is labelled Fixation (sustained high concentration on one region), Wandering (low,
unstable concentration with frequent switching of the top region) or stable.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

TOP_ENTRIES = 32
FIXATION_CONCENTRATION = 0.5  # mean top-region share at or above this, with few switches
WANDERING_CONCENTRATION = 0.3  # mean share below this, with frequent switches
WANDERING_SWITCH_RATE = 0.5


def keep_top(scores: np.ndarray, k: int = TOP_ENTRIES) -> np.ndarray:
    """Zero all but the k largest entries (all kept when there are at most k)."""
    v = np.asarray(scores, dtype=np.float64).copy()
    if v.size > k:
        v[np.argsort(v)[:-k]] = 0.0
    return v


def concentration(scores: np.ndarray) -> float:
    """Share of the positive effect mass on the top region (0 when there is none)."""
    pos = np.clip(np.asarray(scores, dtype=np.float64), 0, None)
    total = pos.sum()
    return float(pos.max() / total) if total > 0 else 0.0


def pca_path(vectors: np.ndarray, previous_axes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(n, K) vectors -> (n, 3) coordinates and the (3, K) axes used (zero-padded when n or K < 3).

    The top-3 principal axes come from the eigen-decomposition of whichever second-moment
    matrix is smaller, the (n, n) Gram matrix or the (K, K) scatter matrix: a trace has tens of
    spans, so this is a tiny symmetric problem instead of an SVD of the (n, K) data."""
    x = np.asarray(vectors, dtype=np.float64)
    n, k = x.shape
    axes = np.zeros((3, k))
    if n < 2:
        return np.zeros((n, 3)), axes
    centred = x - x.mean(axis=0)
    gram = n <= k
    evals, vecs = np.linalg.eigh(centred @ centred.T if gram else centred.T @ centred)  # ascending
    evals, vecs = evals[::-1][:3], vecs[:, ::-1][:, :3]
    m = int((evals > max(float(evals[0]), 0.0) * 1e-12).sum())  # rank-deficient axes stay zero
    axes[:m] = (centred.T @ vecs[:, :m] / np.sqrt(evals[:m])).T if gram else vecs[:, :m].T
    if previous_axes is not None:
        signs = np.sign(np.sum(axes * previous_axes, axis=1))
        axes *= np.where(signs == 0, 1.0, signs)[:, None]
    return centred @ axes.T, axes


def path_length(coords: np.ndarray) -> float:
    c = np.asarray(coords, dtype=np.float64)
    return float(np.linalg.norm(np.diff(c, axis=0), axis=1).sum()) if len(c) > 1 else 0.0


def tortuosity(coords: np.ndarray) -> float | None:
    c = np.asarray(coords, dtype=np.float64)
    if len(c) < 2:
        return None
    net = float(np.linalg.norm(c[-1] - c[0]))
    return path_length(c) / net if net > 1e-12 else None


def label_trace(scores: list[np.ndarray]) -> str:
    """Fixation / Wandering / stable from per-span effect vectors (see module docstring)."""
    if not scores:
        return "stable"
    return _label([concentration(s) for s in scores], [int(np.argmax(s)) for s in scores])


def _label(conc: list[float], tops: list[int]) -> str:
    conc = np.asarray(conc)
    switches = sum(a != b for a, b in zip(tops, tops[1:]))
    rate = switches / max(1, len(tops) - 1)
    if conc.mean() >= FIXATION_CONCENTRATION and rate < WANDERING_SWITCH_RATE:
        return "Fixation"
    if conc.mean() < WANDERING_CONCENTRATION and rate >= WANDERING_SWITCH_RATE:
        return "Wandering"
    return "stable"


@dataclass
class PathPoint:
    span_index: int
    coords: np.ndarray  # (3,) of this span, in the latest fit
    path: np.ndarray  # (n, 3) the whole path so far, in the latest fit
    path_length: float
    tortuosity: float | None
    concentration: float
    label: str


@dataclass
class DynamicsTracker:
    """Online: `add(scores)` per closed span returns the refit path and its statistics."""

    top: int = TOP_ENTRIES
    raw: list[np.ndarray] = field(default_factory=list)
    _axes: np.ndarray | None = None
    # per-span pieces kept so each add() costs one SVD, not a pass over every earlier span
    _kept: list[np.ndarray] = field(default_factory=list)
    _conc: list[float] = field(default_factory=list)
    _tops: list[int] = field(default_factory=list)

    def add(self, scores: np.ndarray) -> PathPoint:
        v = np.asarray(scores, dtype=np.float64)
        self.raw.append(v)
        self._kept.append(keep_top(v, self.top))
        self._conc.append(concentration(v))
        self._tops.append(int(np.argmax(v)))
        coords, self._axes = pca_path(np.stack(self._kept), self._axes)
        return PathPoint(
            span_index=len(self.raw) - 1,
            coords=coords[-1],
            path=coords,
            path_length=path_length(coords),
            tortuosity=tortuosity(coords),
            concentration=self._conc[-1],
            label=_label(self._conc, self._tops),
        )
