"""``attnlrp``: AttnLRP (Achtibat et al., ICML 2024) relevance of the image tokens, per region.

Layer-wise relevance propagation distributes the explained output over the inputs layer by
layer with rules that keep (most of) it conserved, instead of following the raw gradient, whose
product with the input is noisy through RMSNorm, SiLU and the attention's bilinear products.
We use the "gradient x input" form of LRP (Arras et al. 2025; the form the authors' `lxt`
package calls "efficient"): every rule is a change of the backward pass only, so that
activation x modified gradient equals LRP relevance at every layer, and one ordinary backward
per span gives relevance = embedding . modified gradient at the language model's input.
Forward values are untouched. Rules, on the text decoder only (the leaf is its input):

* linear layers (q/k/v/o, MLP, vocabulary head): the plain gradient, which in this form is the
  epsilon rule with epsilon -> 0 (a bias keeps the relevance share it caused);
* RMSNorm (also Qwen3's per-head q/k norms): identity of the normalisation factor (the factor
  is held constant, so the norm is linear in its input);
* the MLP's activation (SiLU): the identity rule, R_in = R_out (gradient out / in);
* the MLP's gate * up product: the uniform rule (half of the relevance to each factor);
* attention softmax(q k^T) v: the uniform rule on both bilinear products (v gets 1/2, q and k
  1/4 each) and the softmax's own gradient, which in this form is the paper's softmax rule
  R_i = x_i (R_i - s_i sum_j R_j); it is not conservative;
* the output log-softmax is treated the same way, so the explained quantity is the span's
  teacher-forced log-prob sum (the ablation effect's units), and the relevance entering the
  logits of token t totals z_y - E_p[z] (log p(y) plus the entropy of p), see `span_relevance`.

Region score = sum over the region's image tokens of the relevance of their input embedding
(summed over the hidden dimension). On Qwen3-VL the relevance reaching the DeepStack visual
features added inside the decoder at an image position is added to that image token (the
same token's features entering twice).

What was adapted, and why not `lxt` itself: `lxt` 2.1 (the authors' package) does not import
with transformers 5.23 (`lxt.efficient` loads its BERT patch, which imports
`find_pruneable_heads_and_indices`, gone from transformers, and a torchvision ViT patch), has no
patch map for Qwen2.5-VL / Qwen3-VL, patches model classes process-wide and for good, and its
attention patch swaps transformers' `ALL_ATTENTION_FUNCTIONS` registry for a plain dict, which
5.x's `get_interface` lookup cannot use. So the same rules are applied here with hooks on this
model's own modules, removed after the call, under `vlm.lock`: no global state, any attention
implementation (sdpa included; the softmax needs no patch), and the q/k/v gradient scaling sits
on the outputs of q_proj/k_proj/v_proj (RoPE and the q/k norms in between are linear under the
rules above, so the scale commutes with them). The identity rule divides by the input with
zero where the input is exactly zero (lxt adds 1e-10 instead).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import numpy as np
import torch

from vstream.attr.capture import text_attention_modules
from vstream.attr.methods.base import AttributionContext, register
from vstream.attr.methods.teacher_forced import forward_with_input_grad
from vstream.model import VLM

__all__ = ["attnlrp", "lrp_rules", "span_relevance"]


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by `factor` (the uniform rule)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        return g * ctx.factor, None


class _IdentityRule(torch.autograd.Function):
    """Forward: the module's own output; backward: gradient x (output / input), elementwise, so
    that input x gradient = output x upstream gradient (relevance passes unchanged)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        zero = x == 0
        ratio = torch.where(zero, torch.zeros_like(out), out / torch.where(zero, torch.ones_like(x), x))
        ctx.save_for_backward(ratio)
        ctx.x_dtype = x.dtype
        return out.view_as(out)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        (ratio,) = ctx.saved_tensors
        return (g * ratio).to(ctx.x_dtype), None


def _identity_hook(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    x = args[0]
    if not torch.is_grad_enabled() or not x.requires_grad or x.shape != out.shape:
        return out
    return _IdentityRule.apply(x, out.detach())


def _scale_output(factor: float):
    def hook(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        return _ScaleGrad.apply(out, factor) if torch.is_grad_enabled() else out

    return hook


def _scale_input(factor: float):
    def hook(module: torch.nn.Module, args: tuple) -> tuple:
        return (_ScaleGrad.apply(args[0], factor), *args[1:]) if torch.is_grad_enabled() else args

    return hook


@contextmanager
def lrp_rules(vlm: VLM) -> Iterator[None]:
    """While inside (holding `vlm.lock`), backward passes through this model's text decoder
    follow the AttnLRP rules of the module docstring; forward values are unchanged.

    Raises NotImplementedError on a decoder layout it does not know (a LayerNorm, an MLP that is
    not gate/up/down + act_fn in every layer, attention without q/k/v projections)."""
    lm = vlm.language_model
    with vlm.lock, ExitStack() as stack:
        hooks = []
        n_mlp = 0
        for mod in lm.modules():
            name = type(mod).__name__
            if isinstance(mod, torch.nn.LayerNorm):
                raise NotImplementedError(f"attnlrp: LayerNorm in the text decoder ({name}) is not supported")
            if name.endswith("RMSNorm"):
                hooks.append(mod.register_forward_hook(_identity_hook))
            if all(hasattr(mod, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")):
                if not isinstance(mod.act_fn, torch.nn.Module):
                    raise NotImplementedError(f"attnlrp: {name}.act_fn is not a module")
                hooks.append(mod.act_fn.register_forward_hook(_identity_hook))
                hooks.append(mod.down_proj.register_forward_pre_hook(_scale_input(0.5)))
                n_mlp += 1
        for h in hooks:
            stack.callback(h.remove)
        if n_mlp != vlm.num_layers:
            raise NotImplementedError(
                f"attnlrp: found {n_mlp} gated MLPs (gate/up/down_proj + act_fn) for {vlm.num_layers} layers"
            )
        for att in text_attention_modules(vlm):
            if not all(hasattr(att, a) for a in ("q_proj", "k_proj", "v_proj")):
                raise NotImplementedError(f"attnlrp: {type(att).__name__} has no q_proj/k_proj/v_proj")
            for proj, factor in ((att.q_proj, 0.25), (att.k_proj, 0.25), (att.v_proj, 0.5)):
                stack.callback(proj.register_forward_hook(_scale_output(factor)).remove)
        yield


def span_relevance(ctx: AttributionContext) -> tuple[torch.Tensor, torch.Tensor]:
    """AttnLRP relevance of every input position for every span's log-prob sum.

    Returns (relevance (n_spans, S) float64 over prompt + trace positions, summed over the hidden
    dimension, DeepStack rows added at their positions; explained (n_spans,) float64: the
    relevance that enters the logits, sum over the span's tokens of z_y - E_p[z]). With perfect
    conservation relevance.sum(1) would equal explained; the softmax rule and the biases keep
    some of it."""
    vlm = ctx.vlm
    gen = torch.as_tensor(ctx.generated_ids).reshape(-1)
    t = int(gen.numel())
    rel = torch.zeros(ctx.n_spans, ctx.inputs.prompt_len + t, dtype=torch.float64)
    explained = torch.zeros(ctx.n_spans, dtype=torch.float64)
    with lrp_rules(vlm), forward_with_input_grad(vlm, ctx.inputs, gen) as fp:
        z = fp.logits.detach().double()
        # relevance at the logits of token t: z . d logp / dz = z_y - sum_v p_v z_v
        at_logits = z.gather(1, gen.to(z.device)[:, None])[:, 0] - (torch.softmax(z, -1) * z).sum(-1)  # (T,)
        leaves = [fp.embeds, *fp.deepstack]
        for i, s in enumerate(ctx.spans):
            lo, hi = int(s.token_start), min(int(s.token_end), t)
            if hi <= lo:
                continue
            grads = torch.autograd.grad(fp.logp[lo:hi].sum(), leaves, retain_graph=i < ctx.n_spans - 1)
            r = (grads[0][0].double() * fp.embeds[0].detach().double()).sum(-1)  # (S,)
            for g, d in zip(grads[1:], fp.deepstack):
                r = r.index_add(0, fp.visual_positions, (g.double() * d.detach().double()).sum(-1))
            rel[i] = r.cpu()
            explained[i] = at_logits[lo:hi].sum().cpu()
    return rel, explained


@register("attnlrp")
def attnlrp(ctx: AttributionContext) -> np.ndarray:
    """sum over the region's image tokens of the AttnLRP relevance of their input embedding."""
    rel, _ = span_relevance(ctx)
    pos = ctx.inputs.image_token_positions.cpu()
    assign = torch.as_tensor(ctx.assignment).double().cpu()
    return (rel[:, pos] @ assign.T).numpy()  # (n_spans, N) @ (N, K)
