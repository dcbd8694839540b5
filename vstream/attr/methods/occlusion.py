"""``occlusion``: leave-one-region-out with the one ablation operator (`vstream.attr.ablation`)."""

from __future__ import annotations

import numpy as np
import torch

from vstream.attr.ablation import ablation_effects
from vstream.attr.methods.base import AttributionContext, register, to_numpy


@register("occlusion")
def occlusion(ctx: AttributionContext) -> np.ndarray:
    """Leave-one-region-out: effect of ablating each region alone (K masks, one batched call)."""
    masks = torch.eye(ctx.k, dtype=torch.bool)
    eff = ablation_effects(ctx.vlm, ctx.inputs, ctx.generated_ids, list(ctx.spans), masks, ctx.assignment)
    return to_numpy(eff).reshape(ctx.k, ctx.n_spans).T
