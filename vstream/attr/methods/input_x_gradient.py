"""``input_x_gradient``: gradient x input at the language model's image embeddings, per region.

x . grad is the first-order estimate of log p(x) - log p(x with the region's embeddings zeroed),
so its sign matches the ablation effect. On Qwen3-VL the DeepStack features injected inside the
decoder are held fixed.
"""

from __future__ import annotations

import numpy as np
import torch

from vstream.attr.methods.base import AttributionContext, register
from vstream.attr.methods.teacher_forced import forward_with_input_grad


@register("input_x_gradient")
def input_x_gradient(ctx: AttributionContext) -> np.ndarray:
    """sum over the region's image tokens of <d logp(span) / d e_i, e_i>, e_i = LLM input embedding."""
    vlm = ctx.vlm
    gen = torch.as_tensor(ctx.generated_ids).reshape(-1)
    t = int(gen.numel())
    pos = ctx.inputs.image_token_positions.to(vlm.device)
    assign = torch.as_tensor(ctx.assignment).float().to(vlm.device)
    scores = torch.zeros(ctx.n_spans, ctx.k, dtype=torch.float64)
    with forward_with_input_grad(vlm, ctx.inputs, gen) as fp:
        emb = fp.embeds
        dt = torch.promote_types(emb.dtype, torch.float32)
        for i, s in enumerate(ctx.spans):
            lo, hi = int(s.token_start), min(int(s.token_end), t)
            if hi <= lo:
                continue
            last = i == ctx.n_spans - 1
            (g,) = torch.autograd.grad(fp.logp[lo:hi].sum(), emb, retain_graph=not last)
            per_token = (g[0, pos].to(dt) * emb[0, pos].detach().to(dt)).sum(-1)  # (N,)
            scores[i] = (assign.to(dt) @ per_token).double().cpu()
    return scores.numpy()
