"""``input_x_gradient``: gradient x input at the language model's image embeddings, per region.

x . grad is the first-order estimate of log p(x) - log p(x with the region's embeddings zeroed),
so its sign matches the ablation effect. On Qwen3-VL the DeepStack features injected inside the
decoder are held fixed.
"""

from __future__ import annotations

import numpy as np
import torch

from vstream.attr.methods.base import AttributionContext, register


@register("input_x_gradient")
def input_x_gradient(ctx: AttributionContext) -> np.ndarray:
    """sum over the region's image tokens of <d logp(span) / d e_i, e_i>, e_i = LLM input embedding."""
    vlm, inputs = ctx.vlm, ctx.inputs
    gen = torch.as_tensor(ctx.generated_ids).reshape(-1)
    t = int(gen.numel())
    pos = inputs.image_token_positions.to(vlm.device)
    assign = torch.as_tensor(ctx.assignment).float().to(vlm.device)
    kw = inputs.teacher_forced(gen)
    grabbed: dict[str, torch.Tensor] = {}

    def pre_hook(module, args, kwargs):  # the LLM's inputs_embeds, image features already in
        leaf = kwargs["inputs_embeds"].detach().requires_grad_(True)
        grabbed["emb"] = leaf
        kwargs["inputs_embeds"] = leaf
        return args, kwargs

    inner = getattr(vlm.model, "model", None)
    handle = vlm.language_model.register_forward_pre_hook(pre_hook, with_kwargs=True)
    saved = getattr(inner, "rope_deltas", None)  # left as it was (a stream may rely on it)
    try:
        with vlm.lock, torch.inference_mode(False), torch.enable_grad():
            kw = {name: v.clone() for name, v in kw.items()}  # normal tensors even if built under inference_mode
            # only the trace's predicting positions P-1 .. P+T-2 go through the vocabulary head
            out = vlm.model(**kw, use_cache=False, logits_to_keep=t + 1)
            logits = out.logits[0, :t]
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            target = gen.to(logits.device)
            logp = torch.log_softmax(logits, dim=-1).gather(1, target[:, None])[:, 0]  # (T,)
            emb = grabbed["emb"]
            dt = torch.promote_types(emb.dtype, torch.float32)
            scores = torch.zeros(ctx.n_spans, ctx.k, dtype=torch.float64)
            for i, s in enumerate(ctx.spans):
                lo, hi = int(s.token_start), min(int(s.token_end), t)
                if hi <= lo:
                    continue
                last = i == ctx.n_spans - 1
                (g,) = torch.autograd.grad(logp[lo:hi].sum(), emb, retain_graph=not last)
                per_token = (g[0, pos].to(dt) * emb[0, pos].detach().to(dt)).sum(-1)  # (N,)
                scores[i] = (assign.to(dt) @ per_token).double().cpu()
    finally:
        handle.remove()
        if hasattr(inner, "rope_deltas"):
            inner.rope_deltas = saved
    return scores.numpy()
