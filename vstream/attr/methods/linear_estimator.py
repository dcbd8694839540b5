"""``vstream``: the trained linear estimator on the span's attention features, no extra pass."""

from __future__ import annotations

import numpy as np

from vstream.attr import features as FV
from vstream.attr.estimator import LinearEstimator
from vstream.attr.methods.base import AttributionContext, register, to_numpy


@register("vstream")
def vstream_scores(ctx: AttributionContext) -> np.ndarray:
    """The linear estimator's predicted per-region ablation effect, on the feature variant the
    estimator was trained on; a `LinearEstimator` scores all spans in one call, and on recorded
    CPU rows of a design linear in them, without materialising the features
    (`features.linear_span_scores`: the same numbers)."""
    if ctx.estimator is None:
        raise ValueError("the vstream method needs ctx.estimator (see vstream.attr.estimator.load)")
    variant = FV.variant_of(ctx.estimator)
    rows = ctx.token_attn
    if (
        isinstance(ctx.estimator, LinearEstimator)
        and variant.linear
        and ctx.features is None
        and rows is not None
        and rows.device.type == "cpu"
    ):
        lo, hi = ctx.span_bounds()
        vw = ctx.value_weights_for(variant)
        w, c = ctx.estimator.numpy_weights()
        vw_np = None if vw is None else to_numpy(vw).astype(np.float32)
        a = to_numpy(ctx.assignment).astype(np.float32)
        return FV.linear_span_scores(rows.detach().float().numpy(), lo, hi, a, variant, w, c, vw_np)
    feats = ctx.span_features(variant)
    if isinstance(ctx.estimator, LinearEstimator):
        s, k, lh = feats.shape
        return ctx.estimator.numpy_predictor()(feats.numpy().reshape(s * k, lh)).reshape(s, k)
    return np.stack([to_numpy(ctx.estimator.predict(f)).reshape(-1) for f in feats])
