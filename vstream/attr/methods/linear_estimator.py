"""``vstream``: the trained linear estimator on the span's attention features, no extra pass."""

from __future__ import annotations

import numpy as np

from vstream.attr.features import variant_of
from vstream.attr.methods.base import AttributionContext, register, to_numpy


@register("vstream")
def vstream_scores(ctx: AttributionContext) -> np.ndarray:
    """The linear estimator's predicted per-region ablation effect, one span at a time, on the
    feature variant the estimator was trained on."""
    if ctx.estimator is None:
        raise ValueError("the vstream method needs ctx.estimator (see vstream.attr.estimator.load)")
    feats = ctx.span_features(variant_of(ctx.estimator))
    return np.stack([to_numpy(ctx.estimator.predict(f)).reshape(-1) for f in feats])
