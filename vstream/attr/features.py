"""Feature variants: which L*H numbers describe region k for a span, named so that an estimator
trained on one design is only ever applied to the same design.

The paper's feature, the default "mean", is per (layer, head) the mean over the span's tokens of
the attention mass on the region's image tokens (`vstream.attr.capture`). Issue 23 asks whether
another design closes the gap to occlusion while the estimator stays one linear map over
per-(layer, head) features. Each candidate is a variant, named by "+"-joined tokens in this
order (the canonical name, which leaves out the default pooling "mean" unless it is alone:
"vnorm" is vnorm+mean; `parse` accepts any order and "mean" anywhere):

  value weighting  vnorm   a_tj * ||v_j||: v_j is image token j's value vector in the key/value
                           head the query head reads (how much the head can move, not only where
                           it looks)
                   vonorm  a_tj * ||W_O^h v_j||: with the head's slice of the output projection,
                           the per-head norm of Kobayashi et al. 2020 ("Attention is not only a
                           weight")
  per token        tnorm   each token's row over the image tokens divided by its total before
                           pooling (where a token looks among the image tokens, not how much)
  pooling          mean | max | last   over the span's tokens ("mean": the paper's)
  per region       rmean   divided by the region's token count (mass per token, not per region)
                   log     log(feature + LOG_EPS)
  side by side     raw     with a value weighting: the same design without it as L*H more
                           columns (weighted block first), so that the estimator weighs where a
                           head looks and how much it can move separately; still one linear map
                           over per-(layer, head) features, two per head

Only "mean" is computed from running sums of rows (`capture.features_from_sum`), unchanged and
bit-identical to before variants existed. The others pool per-token rows here, after weighting.
vnorm / vonorm are constant per (layer, head, image token) through a trace (the image tokens'
values are fixed after prefill): the recorder computes them once at prefill.

A "raw" variant is its `parts` side by side: every function here computes each part and
concatenates, and label folders derive it from the parts' stored features.

The "per region" tokens depend only on the pooled features and the region assignment, both
stored in every label file, so they can be derived from stored labels (`derive`) without
collecting again; the others change what is pooled and need their own labels (`collect
--features` stores several variants from one trace).

numpy only: the attribution process (`vstream.attr.liveproc`) imports it.
Shapes: T span tokens, L layers, H query heads, N image tokens, K regions.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

import numpy as np

from vstream.attr import rowmath

__all__ = [
    "DEFAULT",
    "LOG_EPS",
    "POOLS",
    "TOKENS",
    "VALUE_WEIGHTS",
    "FeatureVariant",
    "LinearFold",
    "can_derive",
    "clip_bounds",
    "derive",
    "finish",
    "is_feature_token",
    "linear_span_scores",
    "names",
    "parse",
    "pool_rows",
    "pool_spans",
    "span_mean_weights",
    "variant_of",
    "weigh_rows",
]

DEFAULT = "mean"
POOLS = ("mean", "max", "last")
VALUE_WEIGHTS = ("vnorm", "vonorm")
LOG_EPS = 1e-6  # below any attention mass that matters (a region's share of one row is >= ~1e-4)
TOKENS = (*VALUE_WEIGHTS, "tnorm", *POOLS, "rmean", "log", "raw")

_DESCRIBE = {
    "vnorm": "attention weighted by the value vector's norm ||v_j|| (per head)",
    "vonorm": "attention weighted by ||W_O^h v_j|| (per head, output projection included)",
    "tnorm": "each token's image row normalised to sum 1 before pooling",
    "mean": "mean over the span's tokens",
    "max": "max over the span's tokens",
    "last": "the span's last token only",
    "rmean": "divided by the region's token count",
    "log": f"log(feature + {LOG_EPS:g})",
    "raw": "beside it, the same without the value weighting (L*H more columns)",
}


@dataclass(frozen=True)
class FeatureVariant:
    """One feature design (see the module doc). `values`: "" or one of VALUE_WEIGHTS."""

    values: str = ""
    token_norm: bool = False
    pool: str = "mean"
    region_mean: bool = False
    log: bool = False
    raw: bool = False

    def __post_init__(self) -> None:
        if self.values not in ("", *VALUE_WEIGHTS):
            raise ValueError(f"unknown value weighting {self.values!r}; choose from {', '.join(VALUE_WEIGHTS)}")
        if self.pool not in POOLS:
            raise ValueError(f"unknown pooling {self.pool!r}; choose from {', '.join(POOLS)}")
        if self.raw and not self.values:
            raise ValueError(f"'raw' adds the unweighted columns beside a value weighting ({', '.join(VALUE_WEIGHTS)})")

    @property
    def tokens(self) -> list[str]:
        out = [self.values] if self.values else []
        out += ["tnorm"] if self.token_norm else []
        out.append(self.pool)
        out += ["rmean"] if self.region_mean else []
        out += ["log"] if self.log else []
        out += ["raw"] if self.raw else []
        return out

    @property
    def name(self) -> str:
        """The tokens joined by "+", "mean" left out unless alone ("vnorm" = vnorm+mean)."""
        return "+".join([t for t in self.tokens if t != "mean"] or ["mean"])

    def __str__(self) -> str:
        return self.name

    @property
    def is_default(self) -> bool:
        return self == FeatureVariant()

    @property
    def pooled(self) -> FeatureVariant:
        """The part computed from rows (without the per-region tokens that `derive` can add)."""
        return replace(self, region_mean=False, log=False)

    @property
    def parts(self) -> tuple[FeatureVariant, ...]:
        """The single designs whose features lie side by side, in column order."""
        if not self.raw:
            return (self,)
        one = replace(self, raw=False)
        return (one, replace(one, values=""))

    @property
    def blocks(self) -> int:
        """L*H-column blocks per region: an estimator of this variant has blocks * L * H weights."""
        return len(self.parts)

    @property
    def linear(self) -> bool:
        """Features linear in the rows (mean pooling, no per-token normalisation, no log): a
        linear estimator's scores then fold into the pooling (`linear_span_scores`)."""
        return self.pool == "mean" and not self.token_norm and not self.log

    def describe(self) -> str:
        return "; ".join(_DESCRIBE[t] for t in self.tokens)


def is_feature_token(token: str) -> bool:
    return token in TOKENS


def parse(name: str | FeatureVariant | None) -> FeatureVariant:
    """A variant from its name ("+"-joined tokens, any order; None or "" is the default)."""
    if isinstance(name, FeatureVariant):
        return name
    tokens = [t.strip() for t in (name or "").split("+") if t.strip()]
    values, pool = "", ""
    flags = {"tnorm": False, "rmean": False, "log": False, "raw": False}
    for t in tokens:
        if t in VALUE_WEIGHTS:
            if values and values != t:
                raise ValueError(f"feature variant {name!r}: one value weighting at most")
            values = t
        elif t in POOLS:
            if pool and pool != t:
                raise ValueError(f"feature variant {name!r}: one pooling at most")
            pool = t
        elif t in flags:
            flags[t] = True
        else:
            raise ValueError(f"unknown feature token {t!r} in {name!r}; known: {', '.join(TOKENS)}")
    return FeatureVariant(values, flags["tnorm"], pool or "mean", flags["rmean"], flags["log"], flags["raw"])


def variant_of(estimator: object) -> FeatureVariant:
    """The variant an estimator reads (its `feature_variant`; the default for anything without)."""
    return parse(getattr(estimator, "feature_variant", DEFAULT))


def weigh_rows(rows: np.ndarray, variant: FeatureVariant, value_weights: np.ndarray | None = None) -> np.ndarray:
    """(T, L, H, N) rows -> the same rows weighted by value norms and/or normalised per token,
    float32. `value_weights`: (L, H, N), needed by the vnorm / vonorm variants."""
    r = np.asarray(rows, dtype=np.float32)
    if variant.values:
        if value_weights is None:
            raise ValueError(f"feature variant {variant.name!r} needs the value weights ({variant.values})")
        r = r * np.asarray(value_weights, dtype=np.float32)[None]
    if variant.token_norm:
        total = r.sum(-1, keepdims=True)
        r = np.divide(r, total, out=np.zeros_like(r), where=total > 0)
    return r


def pool_rows(
    rows: np.ndarray, assignment: np.ndarray, variant: FeatureVariant, value_weights: np.ndarray | None = None
) -> np.ndarray:
    """(T, L, H, N) rows of a span's tokens, (K, N) assignment -> (K, L*H) float32 features of
    `variant`, layer-major (column l*H + h is layer l, head h; a "raw" variant: (K, 2*L*H))."""
    if variant.raw:
        return np.concatenate([pool_rows(rows, assignment, p, value_weights) for p in variant.parts], -1)
    if rows.ndim != 4 or rows.shape[0] < 1:
        raise ValueError(f"rows must be (T >= 1, L, H, N), got {tuple(rows.shape)}")
    t, l, h, n = rows.shape
    a = np.asarray(assignment, dtype=np.float32)
    if a.shape[1:] != (n,) or a.ndim != 2:
        raise ValueError(f"assignment must be (K, {n}), got {tuple(a.shape)}")
    r = weigh_rows(rows, variant, value_weights)
    if variant.pool == "mean":
        f = rowmath.span_features(rowmath.sum_rows(list(r)), t, a)
    elif variant.pool == "last":
        f = rowmath.span_features(r[-1], 1, a)
    else:  # max over tokens of each token's own region features
        f = np.matmul(r.reshape(t, l * h, n), a.T).max(0).T  # (T, L*H, K) -> (K, L*H)
    return finish(np.ascontiguousarray(f, dtype=np.float32), a, variant)


def clip_bounds(bounds: np.ndarray, t: int) -> tuple[np.ndarray, np.ndarray]:
    """(S, 2) [lo, hi) token bounds -> (lo, hi) clipped to the t rows there are, hi >= lo (a
    span past the last row is empty)."""
    b = np.asarray(bounds, dtype=np.int64).reshape(-1, 2)
    lo = np.clip(b[:, 0], 0, t)
    return lo, np.maximum(lo, np.minimum(b[:, 1], t))


def span_mean_weights(lo: np.ndarray, hi: np.ndarray, t: int) -> np.ndarray:
    """(S, T) float32: 1/count on each span's tokens [lo, hi), 0 elsewhere (an empty span's row
    is all 0), so that this matrix times (T, ...) rows is each span's mean row."""
    steps = np.arange(t)
    member = (steps >= lo[:, None]) & (steps < hi[:, None])
    return (member / np.maximum(hi - lo, 1)[:, None]).astype(np.float32)


def pool_spans(
    rows: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    assignment: np.ndarray,
    variant: FeatureVariant,
    value_weights: np.ndarray | None = None,
) -> np.ndarray:
    """`pool_rows` for many spans of one trace at once: (T, L, H, N) rows, spans [lo, hi) (S,)
    with 0 <= lo <= hi <= T -> (S, K, L*H) float32 (an empty span: zeros). The mean is one
    (S, T) weight matrix times the rows (summed in another order than `pool_rows`: equal to
    float32 rounding). Value weights without a per-token normalisation are the same for every
    token, so the mean is taken first and weighted once per span instead of once per token."""
    if variant.raw:
        return np.concatenate([pool_spans(rows, lo, hi, assignment, p, value_weights) for p in variant.parts], -1)
    t, l, h, n = rows.shape
    a = np.asarray(assignment, dtype=np.float32)
    count = hi - lo
    s, k = len(lo), a.shape[0]
    if variant.pool == "mean" and not variant.token_norm:
        mean = span_mean_weights(lo, hi, t) @ np.asarray(rows, dtype=np.float32).reshape(t, l * h * n)
        f = weigh_rows(mean.reshape(s, l, h, n), variant, value_weights).reshape(s, l * h, n) @ a.T
        return _finish_spans(f, a, variant, count)
    r = weigh_rows(rows, variant, value_weights).reshape(t, l * h, n)
    if variant.pool == "mean":
        f = (span_mean_weights(lo, hi, t) @ r.reshape(t, l * h * n)).reshape(s, l * h, n) @ a.T  # (S, L*H, K)
    elif variant.pool == "last":
        f = r[np.maximum(hi - 1, 0)] @ a.T if t else np.zeros((s, l * h, k), dtype=np.float32)
    else:
        per_token = r @ a.T  # (T, L*H, K)
        f = np.stack([per_token[i:j].max(0) if j > i else np.zeros((l * h, k), np.float32) for i, j in zip(lo, hi)])
    return _finish_spans(f, a, variant, count)


def linear_span_scores(
    rows: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    assignment: np.ndarray,
    variant: FeatureVariant,
    weight: np.ndarray,
    bias: np.float32,
    value_weights: np.ndarray | None = None,
) -> np.ndarray:
    """A linear estimator's (S, K) scores of many spans, equal (to float32 rounding) to
    `pool_spans` then `rowmath.linear_scores`, for a `variant.linear` design: the weights w
    (blocks * L*H,) and the value weights fold into one (L*H, N) map that reduces each token's
    row to one value per image token first, so the span means and region sums run on (T, N), not
    (T, L*H, N). A "raw" variant's two blocks fold into the same map (w1 * value weight + w2)."""
    return LinearFold(assignment, variant, weight, bias, value_weights).scores(rows, lo, hi)


class LinearFold:
    """`linear_span_scores` split in two: the fold of the weights, value weights and assignment,
    made once per trace, then applied to span after span (live attribution scores one span at a
    time, and the fold is most of the numpy calls)."""

    def __init__(
        self,
        assignment: np.ndarray,
        variant: FeatureVariant,
        weight: np.ndarray,
        bias: np.float32,
        value_weights: np.ndarray | None,
    ):
        if not variant.linear:
            raise ValueError(f"feature variant {variant.name!r} is not linear in the rows: pool_spans, then predict")
        a = np.asarray(assignment, dtype=np.float32)
        n = a.shape[1]  # image tokens
        blocks = np.asarray(weight, dtype=np.float32).reshape(variant.blocks, -1, 1)  # (blocks, L*H, 1)
        heads = blocks.shape[1]
        if variant.values and value_weights is None:
            raise ValueError(f"feature variant {variant.name!r} needs the value weights ({variant.values})")
        vw = np.asarray(value_weights, dtype=np.float32).reshape(heads, n) if variant.values else None
        fold = np.zeros((heads, n), dtype=np.float32)
        for w, part in zip(blocks, variant.parts):
            fold += w * vw if part.values else w
        if variant.region_mean:
            size = a.sum(1)
            a = np.divide(a, size[:, None], out=np.zeros_like(a), where=size[:, None] > 0)
        self.fold, self.regions, self.bias = fold, a, np.float32(bias)  # (L*H, N), (K, N)

    def scores(self, rows: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """(T, L, H, N) rows, spans [lo, hi) -> (S, K) float32 scores."""
        t, l, h, n = rows.shape
        per_token = np.einsum("tcn,cn->tn", np.asarray(rows, dtype=np.float32).reshape(t, l * h, n), self.fold)
        return (span_mean_weights(lo, hi, t) @ per_token @ self.regions.T + self.bias).astype(np.float32, copy=False)


def _finish_spans(f: np.ndarray, a: np.ndarray, variant: FeatureVariant, count: np.ndarray) -> np.ndarray:
    """(S, L*H, K) pooled -> (S, K, L*H) features, empty spans zero."""
    f = finish(np.ascontiguousarray(f.transpose(0, 2, 1), dtype=np.float32), a, variant)
    f[count == 0] = 0.0
    return f


def finish(features: np.ndarray, assignment: np.ndarray, variant: FeatureVariant) -> np.ndarray:
    """Apply the per-region tokens (rmean, log) to pooled (..., K, L*H) features."""
    f = np.asarray(features, dtype=np.float32)
    if variant.region_mean:
        size = np.asarray(assignment, dtype=np.float32).sum(1)  # (K,) tokens per region
        f = np.divide(f, size[:, None], out=np.zeros_like(f), where=size[:, None] > 0)
    if variant.log:
        f = np.log(f + np.float32(LOG_EPS))
    return f.astype(np.float32, copy=False)


def can_derive(stored: FeatureVariant, want: FeatureVariant) -> bool:
    """Whether features of `want` follow from stored features of `stored` (same pooled part,
    and nothing per-region applied to the stored ones yet)."""
    return stored == want or (stored == stored.pooled and stored == want.pooled)


def derive(features: np.ndarray, assignment: np.ndarray, stored: FeatureVariant, want: FeatureVariant) -> np.ndarray:
    """Stored (..., K, L*H) features of `stored` -> those of `want` (see `can_derive`)."""
    if stored == want:
        return np.asarray(features, dtype=np.float32)
    if not can_derive(stored, want):
        raise ValueError(f"features of {want.name!r} cannot be derived from stored {stored.name!r}")
    return finish(features, assignment, want)


def names(variants: Iterable[str | FeatureVariant]) -> list[str]:
    """Canonical names, in order, without repeats."""
    out: list[str] = []
    for v in variants:
        n = parse(v).name
        if n not in out:
            out.append(n)
    return out
