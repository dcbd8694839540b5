"""``tam``: Token Activation Maps (Li et al., ICCV 2025), summed per span and region.

TAM explains a generated token y by the logit of class y read at the image tokens: its raw map
is m_y[i] = relu(w_y . h_i + b_y), h_i = the decoder's last hidden state (after the final norm,
what the vocabulary head reads) at image token i. Image tokens precede all text, so under the
causal mask these states are the same at every generation step: one teacher-forced forward over
prompt + trace gives every token's map. Then, per generated token y_t, as the paper does:

* estimated causal inference (ECI): earlier context tokens leave activations that show up in
  later maps. The interference is estimated as the mean of the context tokens' own raw maps,
  weighted by how strongly each context position scores class y_t (relu logit of y_t there);
  context tokens identical to y_t are left out. The least-squares multiple of it is subtracted,
  then relu. Context = the text after the first image token (prompt and trace, tokenizer
  special tokens left out) before the position that predicted y_t;
* the map is min-max normalised together with those context scores (the reference code's
  normalisation of image and text tokens on one scale);
* rank Gaussian filter on each image's token grid: in every 3x3 window the sorted values are
  averaged with Gaussian weights over their rank, centred on the median, width = the window's
  coefficient of variation (a robust denoiser).

Span score for region k = sum over the span's tokens of the token's filtered map, summed over
the region's image tokens. TAM's maps are non-negative activations on a per-token [0, 1] scale,
not nats: LDS and R^2 are scale-free per span, top-5 drop and pointing use the order only.

Adapted from the reference code (xmed-lab/TAM), with the reasons: the class of a context token
is the token at that position (the reference uses the greedy prediction for the first prompt
token); repeats are matched by token id instead of decoded string; a 3x3 window whose values
are all equal keeps that value (the reference divides 0 by 0); maps are not quantised to uint8;
a token grid of one row or column is padded by replication (reflection needs two).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from vstream.attr.methods.base import AttributionContext, register
from vstream.attr.methods.teacher_forced import final_hidden_states

__all__ = ["Activations", "activations", "eci", "rank_gaussian_filter", "tam", "token_maps"]


def rank_gaussian_filter(maps: torch.Tensor, size: int = 3) -> torch.Tensor:
    """(B, H, W) -> (B, H, W): per window, Gaussian-over-rank weighted mean of the sorted values
    (sigma = std / mean of the window); 0 where the window's mean is not positive."""
    pad = size // 2
    b, h, w = maps.shape
    mode = "reflect" if min(h, w) > pad else "replicate"
    x = F.pad(maps[:, None].double(), (pad, pad, pad, pad), mode=mode)
    win = F.unfold(x, size).sort(dim=1).values  # (B, size*size, H*W)
    mean = win.mean(1, keepdim=True)
    sigma = (win.std(1, unbiased=False, keepdim=True) / mean.clamp_min(1e-300)).clamp_min(1e-12)
    ax = (torch.arange(size * size, dtype=torch.float64) - size * size // 2).reshape(1, -1, 1)
    kernel = torch.exp(-(ax**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum(1, keepdim=True)
    out = torch.where(mean > 0, (win * kernel).sum(1, keepdim=True), torch.zeros_like(mean))
    return out.reshape(b, h, w).to(maps.dtype)


def eci(raw: torch.Tensor, context_maps: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Estimated causal inference. raw (T, N) maps, context_maps (Q, N) the context tokens' raw
    maps, weights (T, Q) >= 0 (0 = not in token t's context) -> (T, N):
    relu(raw - s * interference), interference = weights-normalised mix of the context maps,
    s = argmin_s ||raw - s * interference||^2 per token."""
    w = weights / (weights.sum(1, keepdim=True) + 1e-8)
    interf = w @ context_maps  # (T, N)
    den = (interf * interf).sum(1, keepdim=True)
    s = torch.where(den > 0, (raw * interf).sum(1, keepdim=True) / den.clamp_min(1e-300), torch.zeros_like(den))
    return (raw - s * interf).clamp_min(0)


@dataclass
class Activations:
    """The class-y_t logits TAM reads, for every generated token y_t (all relu'd, float64).

    `raw`: (T, N) at the image tokens. `context`: (Q,) positions of the context tokens;
    `context_maps`: (Q, N) each context token's own raw map (class = the token at that position);
    `scores`: (T, Q) the logit of y_t at each context position; `visible`: (T, Q) the position
    lies before the one that predicted y_t; `same`: (T, Q) the context token is y_t itself."""

    raw: torch.Tensor
    context: torch.Tensor
    context_maps: torch.Tensor
    scores: torch.Tensor
    visible: torch.Tensor
    same: torch.Tensor


def activations(ctx: AttributionContext) -> Activations:
    """One teacher-forced forward; the vocabulary head's rows of the needed classes only."""
    vlm, inputs = ctx.vlm, ctx.inputs
    gen = torch.as_tensor(ctx.generated_ids).reshape(-1).cpu().long()
    t, p = int(gen.numel()), inputs.prompt_len
    img = inputs.image_token_positions.cpu().long()  # (N,)
    h = final_hidden_states(vlm, inputs, gen)  # (S, D)
    ids = torch.cat([inputs.input_ids[0].cpu().long(), gen])  # (S,)
    pos = torch.arange(ids.numel())
    special = torch.tensor(sorted(set(vlm.tokenizer.all_special_ids)), dtype=torch.long)
    first = int(img.min()) if img.numel() else p
    cpos = pos[(pos > first) & ~torch.isin(pos, img) & ~torch.isin(ids, special)]  # (Q,)
    classes, inv = torch.unique(torch.cat([gen, ids[cpos]]), return_inverse=True)
    gen_cls, ctx_cls = inv[:t], inv[t:]
    head = vlm.model.get_output_embeddings()
    dev, dt = h.device, torch.promote_types(h.dtype, torch.float32)
    wt = head.weight.detach()[classes.to(dev)].to(dt)  # (U, D)
    bias = getattr(head, "bias", None)
    b = bias.detach()[classes.to(dev)].to(dt)[:, None] if bias is not None else 0.0
    z_img = (wt @ h[img.to(dev)].to(dt).T + b).clamp_min(0).double().cpu()  # (U, N)
    z_ctx = (wt @ h[cpos.to(dev)].to(dt).T + b).clamp_min(0).double().cpu()  # (U, Q)
    # token t (at position p + t) was predicted at p + t - 1; its context lies strictly before
    visible = cpos[None, :] < (p + torch.arange(t) - 1)[:, None]
    same = ids[cpos][None, :] == gen[:, None]
    return Activations(z_img[gen_cls], cpos, z_img[ctx_cls], z_ctx[gen_cls], visible, same)


def token_maps(ctx: AttributionContext) -> torch.Tensor:
    """(T, N) float64: each generated token's TAM over the image tokens (ECI, normalised, filtered)."""
    a = activations(ctx)
    t, n = a.raw.shape
    if n == 0:
        return a.raw
    m = eci(a.raw, a.context_maps, torch.where(a.visible & ~a.same, a.scores, torch.zeros_like(a.scores)))
    # min-max on one scale with the visible context scores
    inf = torch.tensor(float("inf"), dtype=torch.float64)
    lo = torch.cat([m, torch.where(a.visible, a.scores, inf)], 1).min(1, keepdim=True).values
    hi = torch.cat([m, torch.where(a.visible, a.scores, -inf)], 1).max(1, keepdim=True).values
    m = torch.where(hi > lo, (m - lo) / (hi - lo).clamp_min(1e-300), torch.zeros_like(m))
    grid = ctx.inputs.token_grid
    if grid is not None and n % (grid[0] * grid[1]) == 0:
        m = rank_gaussian_filter(m.reshape(-1, *grid)).reshape(t, n)
    return m


@register("tam")
def tam(ctx: AttributionContext) -> np.ndarray:
    """sum over the span's tokens and the region's image tokens of the token activation maps."""
    maps = token_maps(ctx)  # (T, N)
    assign = torch.as_tensor(ctx.assignment).double().cpu()  # (K, N)
    t = maps.shape[0]
    out = torch.zeros(ctx.n_spans, ctx.k, dtype=torch.float64)
    for i, s in enumerate(ctx.spans):
        lo, hi = int(s.token_start), min(int(s.token_end), t)
        if hi > lo:
            out[i] = assign @ maps[lo:hi].sum(0)
    return out.numpy()
