"""``raw_attention``: the span's attention mass on each region, summed over layers and heads."""

from __future__ import annotations

import numpy as np

from vstream.attr.estimator import RawAttention
from vstream.attr.methods.base import AttributionContext, register


@register("raw_attention")
def raw_attention(ctx: AttributionContext) -> np.ndarray:
    """Attention mass of the span on each region, summed over all layers and heads."""
    return RawAttention().predict(ctx.span_features()).numpy()
