"""Picking the next token from a row of logits: one rule for the engine and the paradigm runner."""

from __future__ import annotations

import math
from collections.abc import Collection

import torch

__all__ = ["next_token"]


def next_token(
    logits: torch.Tensor,
    suppress: Collection[int] = (),
    do_sample: bool = False,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> int:
    """Greedy (or, with do_sample, sampled at `temperature`) token of (vocab,) logits, never one of
    `suppress` (the protocol, not the model, decides when reasoning may end)."""
    if suppress:
        with torch.inference_mode():
            logits = logits.clone()
            logits[list(suppress)] = -math.inf
    if do_sample:
        probs = torch.softmax(logits / max(float(temperature), 1e-6), dim=-1)
        return int(torch.multinomial(probs.cpu(), 1, generator=generator))
    return int(logits.argmax())
