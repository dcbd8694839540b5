"""``vstream``: the trained linear estimator on the span's attention features, no extra pass."""

from __future__ import annotations

import numpy as np

from vstream.attr.estimator import LinearEstimator
from vstream.attr.features import variant_of
from vstream.attr.methods.base import AttributionContext, register, to_numpy


@register("vstream")
def vstream_scores(ctx: AttributionContext) -> np.ndarray:
    """The linear estimator's predicted per-region ablation effect, on the feature variant the
    estimator was trained on; a `LinearEstimator` scores all spans in one call."""
    if ctx.estimator is None:
        raise ValueError("the vstream method needs ctx.estimator (see vstream.attr.estimator.load)")
    feats = ctx.span_features(variant_of(ctx.estimator))
    if isinstance(ctx.estimator, LinearEstimator):
        s, k, lh = feats.shape
        return ctx.estimator.numpy_predictor()(feats.numpy().reshape(s * k, lh)).reshape(s, k)
    return np.stack([to_numpy(ctx.estimator.predict(f)).reshape(-1) for f in feats])
