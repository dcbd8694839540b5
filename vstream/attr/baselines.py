"""Attribution methods behind one call: `attribute(method, ctx) -> (n_spans, K) region scores`.

Every method answers the same question as vSTREAM's estimator: how much does thinking span S
rely on image region k, in units of the ablation effect (the drop of the span's teacher-forced
log-prob sum when the region is removed; positive = the span relied on it). A subset's effect is
predicted as the sum of its regions' scores, which is how `vstream.attr.evaluate` scores them all.

    ctx = AttributionContext(vlm, inputs, generated_ids, spans, assignment,
                             token_attn=rows, estimator=est)
    scores = attribute("occlusion", ctx)          # np.ndarray (len(spans), K)

Methods (Captum style: one function each, registered by name in `METHODS`):

* ``vstream``: the trained linear estimator on the span's attention features
  (`capture.region_features`: per (layer, head), mean over span tokens of the attention mass on
  the region); recorded during generation, so no extra forward or backward pass.
* ``raw_attention``: the same features summed over layers and heads, no estimator.
* ``input_x_gradient``: gradient of the span's teacher-forced log-prob sum w.r.t. the LLM's
  input embeddings at the image positions (after the vision tower, i.e. what the language model
  receives as `inputs_embeds`), dotted with those embeddings per token, summed per region.
  One forward over prompt + trace, then one backward per span. x . grad is the first-order
  estimate of log p(x) - log p(x with the region's embeddings zeroed), so its sign matches the
  ablation effect. On Qwen3-VL the DeepStack features injected inside the decoder are held fixed.
* ``occlusion``: leave-one-region-out: the measured effect of ablating region k alone, with the
  one ablation operator (`vstream.attr.ablation.ablation_effects`, K one-region masks, batched).

The library never imports gradio.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from vstream.attr.ablation import ablation_effects
from vstream.attr.capture import region_features

__all__ = [
    "METHODS",
    "AttributionContext",
    "attribute",
    "attribute_timed",
    "raw_attention",
    "input_x_gradient",
    "occlusion",
    "register",
    "teacher_forced_kwargs",
    "vstream_scores",
]

METHODS: dict[str, Callable[["AttributionContext"], np.ndarray]] = {}


def register(name: str) -> Callable:
    """Decorator: make `fn(ctx) -> (n_spans, K)` available as `attribute(name, ctx)`."""

    def deco(fn: Callable[["AttributionContext"], np.ndarray]) -> Callable:
        METHODS[name] = fn
        return fn

    return deco


@dataclass
class AttributionContext:
    """Everything any method may need about one generated trace.

    `generated_ids`: (T,) the visible generated tokens (eos dropped), the teacher-forced target.
    `spans`: `vstream.attr.spans.Span`s whose token_start/token_end index `generated_ids`.
    `assignment`: (K, N) region -> image token matrix (`Regions.assignment`).
    `token_attn`: (T', L, H, N) recorded attention rows (row i = generated token i, see
    `vstream.attr.capture`); or give `features` (n_spans, K, L*H) directly.
    `estimator`: anything with `predict(features (K, L*H)) -> (K,)` (vSTREAM only).
    """

    vlm: Any
    inputs: Any  # vstream.model.vlm.VLMInputs
    generated_ids: torch.Tensor
    spans: Sequence[Any]
    assignment: torch.Tensor
    token_attn: torch.Tensor | None = None
    features: torch.Tensor | None = None
    estimator: Any = None
    regions: Any = None  # vstream.attr.regions.Regions, optional (drawing, pointing)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def k(self) -> int:
        return int(self.assignment.shape[0])

    @property
    def n_spans(self) -> int:
        return len(self.spans)

    def span_features(self) -> torch.Tensor:
        """(n_spans, K, L*H) float32 features; computed from `token_attn` on every call unless
        `features` was given (so each method's timing includes this cheap pooling).
        A span without any recorded row gets zeros."""
        if self.features is not None:
            f = torch.as_tensor(self.features).float()
            if f.ndim != 3 or f.shape[0] != self.n_spans or f.shape[1] != self.k:
                raise ValueError(f"features must be ({self.n_spans}, {self.k}, L*H), got {tuple(f.shape)}")
            return f
        if self.token_attn is None:
            raise ValueError("this method needs token_attn (recorded attention rows) or features")
        rows = self.token_attn
        _, l, h, _ = rows.shape
        assign = torch.as_tensor(self.assignment).to(rows.device)
        out = torch.zeros(self.n_spans, self.k, l * h)
        for i, s in enumerate(self.spans):
            lo, hi = int(s.token_start), min(int(s.token_end), rows.shape[0])
            if hi > lo:
                out[i] = region_features(rows[lo:hi], assign).float().cpu()
        return out


def attribute(method: str, ctx: AttributionContext) -> np.ndarray:
    """Region scores of every span: float64 array (ctx.n_spans, ctx.k)."""
    if method not in METHODS:
        raise ValueError(f"unknown attribution method {method!r}; choose from {', '.join(METHODS)}")
    if ctx.n_spans == 0:
        return np.zeros((0, ctx.k))
    out = np.asarray(METHODS[method](ctx), dtype=np.float64)
    if out.shape != (ctx.n_spans, ctx.k):
        raise RuntimeError(f"{method} returned shape {out.shape}, expected {(ctx.n_spans, ctx.k)}")
    return out


def attribute_timed(method: str, ctx: AttributionContext) -> tuple[np.ndarray, float]:
    """`attribute` plus its wall-clock seconds (whole trace; divide by n_spans for per span)."""
    t0 = time.perf_counter()
    out = attribute(method, ctx)
    return out, time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------
# methods


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


@register("vstream")
def vstream_scores(ctx: AttributionContext) -> np.ndarray:
    """The linear estimator's predicted per-region ablation effect, one span at a time."""
    if ctx.estimator is None:
        raise ValueError("the vstream method needs ctx.estimator (see vstream.attr.estimator.load)")
    feats = ctx.span_features()
    return np.stack([_to_numpy(ctx.estimator.predict(f)).reshape(-1) for f in feats])


@register("raw_attention")
def raw_attention(ctx: AttributionContext) -> np.ndarray:
    """Attention mass of the span on each region, summed over all layers and heads."""
    return ctx.span_features().sum(-1).numpy()


def teacher_forced_kwargs(vlm: Any, inputs: Any, generated_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """model(**kw) over prompt + generated trace, one sequence (mm_token_type_ids extended)."""
    kw = dict(inputs.model_kwargs)
    ids = kw["input_ids"]
    gen = torch.as_tensor(generated_ids).reshape(1, -1).to(device=ids.device, dtype=ids.dtype)
    kw["input_ids"] = torch.cat([ids, gen], dim=1)
    kw["attention_mask"] = torch.ones_like(kw["input_ids"])
    if "mm_token_type_ids" in kw:
        mm = kw["mm_token_type_ids"]
        kw["mm_token_type_ids"] = torch.cat([mm, torch.zeros_like(gen, dtype=mm.dtype)], dim=1)
    return kw


def _language_model(vlm: Any) -> torch.nn.Module:
    lm = getattr(getattr(vlm.model, "model", None), "language_model", None)
    if lm is None:
        raise RuntimeError(f"cannot find the language model of {type(vlm.model).__name__} (model.model.language_model)")
    return lm


@register("input_x_gradient")
def input_x_gradient(ctx: AttributionContext) -> np.ndarray:
    """sum over the region's image tokens of <d logp(span) / d e_i, e_i>, e_i = LLM input embedding."""
    vlm, inputs = ctx.vlm, ctx.inputs
    gen = torch.as_tensor(ctx.generated_ids).reshape(-1)
    t = int(gen.numel())
    pos = inputs.image_token_positions.to(vlm.device)
    assign = torch.as_tensor(ctx.assignment).float().to(vlm.device)
    kw = teacher_forced_kwargs(vlm, inputs, gen)
    grabbed: dict[str, torch.Tensor] = {}

    def pre_hook(module, args, kwargs):  # the LLM's inputs_embeds, image features already in
        leaf = kwargs["inputs_embeds"].detach().requires_grad_(True)
        grabbed["emb"] = leaf
        kwargs["inputs_embeds"] = leaf
        return args, kwargs

    inner = getattr(vlm.model, "model", None)
    handle = _language_model(vlm).register_forward_pre_hook(pre_hook, with_kwargs=True)
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


@register("occlusion")
def occlusion(ctx: AttributionContext) -> np.ndarray:
    """Leave-one-region-out: effect of ablating each region alone (K masks, one batched call)."""

    masks = torch.eye(ctx.k, dtype=torch.bool)
    eff = ablation_effects(ctx.vlm, ctx.inputs, ctx.generated_ids, list(ctx.spans), masks, ctx.assignment)
    return _to_numpy(eff).reshape(ctx.k, ctx.n_spans).T
