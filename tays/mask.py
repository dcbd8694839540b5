"""TaYS streaming attention mask (issue item 1), for training, prefill and as the engine's oracle.

A streaming sequence is a list of segments, each a contiguous run of tokens of one kind:

* ``prompt``: the question (chat-templated user turn). Causal inside, visible to everything.
* ``frame``:  one frame group (``temporal_patch_size`` frames -> ``th * tw`` LLM tokens) with the
  time it arrived. A frame token sees the prompt, earlier frame groups and, causally, its own
  group; never any reasoning token (the video cache is written by frames only).
* ``text``:   reasoning tokens decoded at a time ``t``. They see the prompt, the frame groups that
  had arrived by ``t`` (``frame.time <= t``; or, exactly, the first ``frames_seen`` groups when
  that is given, which is what the engine records), and earlier reasoning, causally.

Order rules: frame groups are ordered by their order in the list (their times must not go
down); reasoning tokens likewise. Where a segment sits in the list does not matter otherwise,
so ``[prompt, f0, r0, f1, r1]`` (chronological) and ``[prompt, f0, f1, r0, r1]`` give the same
attention pattern (only the positions, from `tays.positions`, say where tokens are).

``visual_window=W`` keeps only the newest W frame groups visible (the engine's eviction): a
reasoning token sees the newest W groups among those it may see, a frame group sees the W-1
groups before it plus itself. The prompt is never evicted.

The result is a boolean (L, L) matrix, True = query row may attend to key column;
`additive_mask` turns it into the 4-D float mask (0 / dtype-min) attention kernels take.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["FRAME", "PROMPT", "TEXT", "Segment", "additive_mask", "segment_slices", "streaming_mask"]

PROMPT, FRAME, TEXT = "prompt", "frame", "text"
_KINDS = (PROMPT, FRAME, TEXT)


@dataclass(frozen=True)
class Segment:
    """A contiguous run of `length` tokens of one kind (see the module docstring).

    time: frames: arrival time (s) of the group; text: the time its tokens were decoded.
    grid: frames only: (tokens high, tokens wide) of the group; `length` must be th * tw.
    index: frames only: absolute frame-group index (temporal mRoPE position); default: its
        order among the frame segments of the sequence.
    frames_seen: text only: sees exactly the first `frames_seen` frame groups (overrides time).
    """

    kind: str
    length: int
    time: float = 0.0
    grid: tuple[int, int] | None = None
    index: int | None = None
    frames_seen: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"segment kind must be one of {_KINDS}, got {self.kind!r}")
        if int(self.length) < 0:
            raise ValueError(f"segment length must be >= 0, got {self.length}")
        if self.grid is not None and self.grid[0] * self.grid[1] != self.length:
            raise ValueError(f"frame segment of length {self.length} does not match grid {self.grid}")


def segment_slices(segments: Sequence[Segment]) -> list[slice]:
    """Token range of each segment in the flattened sequence."""
    out, start = [], 0
    for s in segments:
        out.append(slice(start, start + s.length))
        start += s.length
    return out


def _frame_order(segments: Sequence[Segment]) -> dict[int, int]:
    """segment index -> frame-group order (0, 1, ...); checks that times do not go down."""
    order: dict[int, int] = {}
    last = -math.inf
    for i, s in enumerate(segments):
        if s.kind == FRAME:
            if s.time < last:
                raise ValueError("frame segments must be listed in arrival order (times must not go down)")
            last = s.time
            order[i] = len(order)
    return order


def streaming_mask(
    segments: Sequence[Segment],
    visual_window: int | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Boolean (L, L) streaming attention mask: True where query (row) may attend to key (col)."""
    if visual_window is not None and int(visual_window) < 1:
        raise ValueError(f"visual_window must be >= 1 or None, got {visual_window}")
    segs = list(segments)
    slices = segment_slices(segs)
    total = slices[-1].stop if slices else 0
    mask = torch.zeros(total, total, dtype=torch.bool, device=device)
    forder = _frame_order(segs)
    frame_times = [segs[i].time for i in forder]  # by frame order
    W = None if visual_window is None else int(visual_window)

    def visible_frames_for_text(s: Segment) -> range:
        if s.frames_seen is not None:
            n = max(0, min(int(s.frames_seen), len(frame_times)))
        else:
            n = sum(1 for t in frame_times if t <= s.time)
        return range(n - W if W is not None and n > W else 0, n)

    porder = {i: k for k, i in enumerate(i for i, s in enumerate(segs) if s.kind == PROMPT)}
    torder = {i: k for k, i in enumerate(i for i, s in enumerate(segs) if s.kind == TEXT)}
    for a, qa in enumerate(segs):
        if qa.length == 0:
            continue
        seen_frames = visible_frames_for_text(qa) if qa.kind == TEXT else None
        for b, kb in enumerate(segs):
            if kb.length == 0:
                continue
            if a == b:
                full = None  # causal block
            elif kb.kind == PROMPT:
                full = qa.kind != PROMPT or porder[b] < porder[a]
            elif kb.kind == FRAME:
                if qa.kind == FRAME:
                    ga, gb = forder[a], forder[b]
                    full = gb < ga and (W is None or ga - gb < W)
                elif qa.kind == TEXT:
                    full = forder[b] in seen_frames
                else:
                    full = False
            else:  # key is reasoning: only later reasoning sees it
                full = qa.kind == TEXT and torder[b] < torder[a]
            rs, cs = slices[a], slices[b]
            if full is None:
                mask[rs, cs] = torch.ones(qa.length, qa.length, dtype=torch.bool, device=device).tril()
            elif full:
                mask[rs, cs] = True
    return mask


def additive_mask(mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(L, L) boolean mask -> (1, 1, L, L) additive float mask: 0 where allowed, dtype-min elsewhere
    (dtype-min rather than -inf, so a fully masked row gives no NaN)."""
    out = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    out.masked_fill_(~mask, torch.finfo(dtype).min)
    return out[None, None]
