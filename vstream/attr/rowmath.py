"""The numpy arithmetic of live attribution, importable without torch.

The attribution process (`vstream.attr.liveproc`) imports only this and `vstream.attr.dynamics`,
so it starts in a fraction of a second; the in-process paths (`capture`, `worker`) call the same
functions, so a span scored there and replayed here gives the same numbers.

Shapes: T decode steps, L layers, H query heads (Hkv key heads, G = H / Hkv per key head),
D head size, S keys, N image tokens, K regions.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "decode_scores",
    "image_mass",
    "image_rows",
    "linear_scores",
    "span_features",
    "sum_rows",
    "top_regions",
]


def decode_scores(queries: np.ndarray, keys: np.ndarray, lens: np.ndarray, scaling: float) -> np.ndarray:
    """(T, L, H, D) decode queries and (L, Hkv, >=S, D) key caches -> (T, L, H, S) float32 scaled
    scores, S = max(lens), -inf past each step's own key length `lens[t]` (the cache only grows,
    so the latest keys serve every earlier step)."""
    t, nl, h, _ = queries.shape
    sc = _grouped_scores(queries, keys, lens, scaling)
    return sc.transpose(2, 0, 1, 3, 4).reshape(t, nl, h, sc.shape[-1])


def image_mass(scores: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """(T, L, H, S) scores -> (T, L, H, N) softmax mass on the image positions, float32 as eager
    attention computes it (only the N kept columns are divided)."""
    e = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return np.ascontiguousarray(e[..., positions] / e.sum(axis=-1, keepdims=True), dtype=np.float32)


def image_rows(
    queries: np.ndarray, keys: np.ndarray, lens: np.ndarray, scaling: float, positions: np.ndarray
) -> np.ndarray:
    """`image_mass(decode_scores(...))` for steps without an attention mask, to the bit: the
    softmax runs in place in the GEMM's own layout and only the (T, L, H, N) result is
    transposed, so the (T, L, H, S) scores are never copied (a fifth fewer numpy time per span
    in the attribution process)."""
    t, nl, h, _ = queries.shape
    sc = _grouped_scores(queries, keys, lens, scaling)
    sc -= sc.max(axis=-1, keepdims=True)
    np.exp(sc, out=sc)
    out = sc[..., positions]
    out /= sc.sum(axis=-1, keepdims=True)
    return out.transpose(2, 0, 1, 3, 4).reshape(t, nl, h, -1)


def _grouped_scores(queries: np.ndarray, keys: np.ndarray, lens: np.ndarray, scaling: float) -> np.ndarray:
    """`decode_scores` in the GEMM's layout, (L, Hkv, T, G, S), G = H / Hkv: the T steps share
    each GEMM, L*Hkv products of (T*G, D) x (D, S) instead of T times as many single rows."""
    t, nl, h, d = queries.shape
    s = int(lens.max())
    kk = keys[:, :, :s]  # (L, Hkv, S, D)
    hkv = kk.shape[1]
    g = h // hkv
    q = queries.reshape(t, nl, hkv, g, d).transpose(1, 2, 0, 3, 4).reshape(nl, hkv, t * g, d)
    sc = np.matmul(q, kk.transpose(0, 1, 3, 2)).reshape(nl, hkv, t, g, s)
    sc *= np.float32(scaling)
    for i in np.flatnonzero(lens < s):  # each step sees its own keys only
        sc[:, :, i, :, lens[i] :] = -np.inf
    return sc


def sum_rows(rows: Sequence[np.ndarray]) -> np.ndarray:
    """(L, H, N) sum of rows, added one at a time in order (memory stays one row; every path adds
    in the same order, so the sums agree to the bit)."""
    total = rows[0].copy()
    for r in rows[1:]:
        total += r
    return total


def span_features(total: np.ndarray, count: int, assignment: np.ndarray) -> np.ndarray:
    """(L, H, N) attention summed over `count` tokens, (K, N) assignment -> (K, L*H) features,
    layer-major (column l*H + h is layer l, head h)."""
    l, h, n = total.shape
    return (assignment @ total.reshape(l * h, n).T) / np.float32(count)


def linear_scores(features: np.ndarray, weight: np.ndarray, bias: np.float32) -> np.ndarray:
    """(K, L*H) features -> (K,) float32 predicted effects of the linear estimator."""
    return (features @ weight + bias).astype(np.float32, copy=False)


def top_regions(scores: np.ndarray, n: int) -> list[int]:
    """Region ids of the n highest scores, highest first (ties: lower id first)."""
    return [int(i) for i in np.argsort(-scores, kind="stable")[: min(n, scores.size)]]
