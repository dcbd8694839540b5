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
    pos = np.maximum(np.asarray(scores, dtype=np.float64), 0.0)
    total = float(pos.sum())
    return float(pos.max()) / total if total > 0 else 0.0


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
    centred = x - np.add.reduce(x, axis=0) / n  # x.mean(0) without its Python wrapper (runs per span)
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
    return path_shape(coords)[0]


def tortuosity(coords: np.ndarray) -> float | None:
    return path_shape(coords)[1]


def path_shape(coords: np.ndarray) -> tuple[float, float | None]:
    """(path length, tortuosity) of an (n, 3) path, from one pass over its steps."""
    c = np.asarray(coords, dtype=np.float64)
    if len(c) < 2:
        return 0.0, None
    steps = c[1:] - c[:-1]
    length = float(np.sqrt(np.einsum("ij,ij->i", steps, steps)).sum())
    end = c[-1] - c[0]
    net = float(np.sqrt(end @ end))
    return length, (length / net if net > 1e-12 else None)


def label_trace(scores: list[np.ndarray]) -> str:
    """Fixation / Wandering / stable from per-span effect vectors (see module docstring)."""
    if not scores:
        return "stable"
    return _label([concentration(s) for s in scores], [int(np.argmax(s)) for s in scores])


def _label(conc: list[float], tops: list[int]) -> str:
    switches = sum(a != b for a, b in zip(tops, tops[1:]))
    return _label_from(sum(conc) / len(conc), switches / max(1, len(tops) - 1))


def _label_from(mean_concentration: float, switch_rate: float) -> str:
    if mean_concentration >= FIXATION_CONCENTRATION and switch_rate < WANDERING_SWITCH_RATE:
        return "Fixation"
    if mean_concentration < WANDERING_CONCENTRATION and switch_rate >= WANDERING_SWITCH_RATE:
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
    # running pieces, so each add() costs one small eigenproblem, not a pass over every earlier span
    _kept: np.ndarray | None = None  # (capacity, K): row i is span i's kept vector; grown by doubling
    _conc_sum: float = 0.0
    _switches: int = 0
    _last_top: int = -1

    def add(self, scores: np.ndarray) -> PathPoint:
        v = np.asarray(scores, dtype=np.float64)
        self.raw.append(v)
        kept = keep_top(v, self.top)
        n = len(self.raw)
        if self._kept is None or len(self._kept) < n:
            grown = np.zeros((max(16, 2 * n), kept.size))
            if self._kept is not None:
                grown[: n - 1] = self._kept[: n - 1]
            self._kept = grown
        self._kept[n - 1] = kept  # (a vector of another length than the earlier ones raises)
        conc = concentration(v)
        top = int(v.argmax())
        self._conc_sum += conc
        self._switches += n > 1 and top != self._last_top
        self._last_top = top
        coords, self._axes = pca_path(self._kept[:n], self._axes)
        length, tort = path_shape(coords)
        return PathPoint(
            span_index=n - 1,
            coords=coords[-1],
            path=coords,
            path_length=length,
            tortuosity=tort,
            concentration=conc,
            label=_label_from(self._conc_sum / n, self._switches / max(1, n - 1)),
        )
