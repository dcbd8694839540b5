"""The registry, the context every method reads, and the one `attribute` call."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from vstream.attr import features as FV
from vstream.attr.capture import pool_spans
from vstream.attr.estimator import Estimator
from vstream.attr.regions import Regions
from vstream.attr.spans import Span
from vstream.model import VLM, VLMInputs

METHODS: dict[str, Callable[[AttributionContext], np.ndarray]] = {}


def register(name: str) -> Callable:
    """Decorator: make `fn(ctx) -> (n_spans, K)` available as `attribute(name, ctx)`."""

    def deco(fn: Callable[[AttributionContext], np.ndarray]) -> Callable:
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
    `vstream.attr.capture`); or give `features` (n_spans, K, L*H) directly, of the variant
    `features_variant` (`vstream.attr.features`).
    `estimator`: anything with `predict(features (K, L*H)) -> (K,)` (vSTREAM only).
    `value_weights`: {vnorm|vonorm: (L, H, N)} of the trace (`labels.trace_with_capture`), for
    an estimator that reads value-weighted features.
    """

    vlm: VLM
    inputs: VLMInputs
    generated_ids: torch.Tensor
    spans: Sequence[Span]
    assignment: torch.Tensor
    token_attn: torch.Tensor | None = None
    features: torch.Tensor | None = None
    estimator: Estimator | None = None
    regions: Regions | None = None  # optional (drawing, pointing)
    extra: dict[str, Any] = field(default_factory=dict)
    value_weights: dict[str, torch.Tensor] = field(default_factory=dict)
    features_variant: str = FV.DEFAULT  # the variant `features` holds, when given

    @property
    def k(self) -> int:
        return int(self.assignment.shape[0])

    @property
    def n_spans(self) -> int:
        return len(self.spans)

    def span_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Each span's recorded rows [lo, hi) (S,) each, clipped to the rows there are."""
        t = 0 if self.token_attn is None else int(self.token_attn.shape[0])
        return FV.clip_bounds(np.asarray([(int(s.token_start), int(s.token_end)) for s in self.spans]), t)

    def value_weights_for(self, variant: FV.FeatureVariant) -> torch.Tensor | None:
        """The trace's value weights that `variant` reads (None when it reads none)."""
        if not variant.values:
            return None
        if variant.values not in self.value_weights:
            raise ValueError(f"feature variant {variant.name!r} needs the trace's {variant.values} value weights")
        return self.value_weights[variant.values]

    def span_features(self, variant: str | FV.FeatureVariant = FV.DEFAULT) -> torch.Tensor:
        """(n_spans, K, L*H) float32 features of `variant` (default: the paper's); computed
        from `token_attn` on every call unless `features` was given (so each method's timing
        includes this pooling: all spans at once, `capture.pool_spans`); given features of
        another variant are refused.
        A span without any recorded row gets zeros."""
        v = FV.parse(variant)
        if self.features is not None:
            if FV.parse(self.features_variant) != v:
                raise ValueError(f"features of variant {self.features_variant!r} given, {v.name!r} asked for")
            f = torch.as_tensor(self.features).float()
            if f.ndim != 3 or f.shape[0] != self.n_spans or f.shape[1] != self.k:
                raise ValueError(f"features must be ({self.n_spans}, {self.k}, L*H), got {tuple(f.shape)}")
            return f
        if self.token_attn is None:
            raise ValueError("this method needs token_attn (recorded attention rows) or features")
        bounds = [(int(s.token_start), int(s.token_end)) for s in self.spans]
        return pool_spans(self.token_attn, bounds, self.assignment, v, self.value_weights_for(v)).float().cpu()


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


def to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)
