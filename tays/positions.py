"""TaYS decoupled positions on Qwen2.5-VL's 3-D mRoPE (issue item 2).

Position ids are (3, L): temporal, height, width rows, as Qwen2.5-VL's `get_rope_index` makes.

* prompt tokens: 0 .. P-1 on all three axes (plain text RoPE).
* frame group g with a (th, tw) token grid: ``(V0 + floor(g * interval), V0 + row, V0 + col)``,
  exactly what `get_rope_index` gives the g-th temporal group of a video that starts at text
  position V0, with ``interval = tokens_per_second * second_per_grid``
  (``second_per_grid = temporal_patch_size / fps``). g is the absolute group index since the
  stream began, so a group keeps its position whether or not older groups were evicted.
* reasoning token i (the i-th token of the text cache, counting the assistant header):
  ``R0 + i`` on all three axes, a counter of its own that video growth never moves.

Bases: V0 = R0 = P by default, i.e. both the video axis and the reasoning axis start right after
the prompt (the TaYS write-up's ``pos(v_s) = s, pos(r_t) = t``, both counted from where the
prompt ends). Reasoning and the first frame group thus start at the same position; what matters
is that the reasoning positions, and every query/key relative distance between reasoning and a
given frame, do not depend on how many frames exist. Both bases can be overridden (e.g.
``R0 = P + max(th, tw)``, which is where transformers 5.23's own `get_rope_index` puts text that
follows a single video block).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tays.mask import FRAME, PROMPT, TEXT, Segment

__all__ = [
    "frame_position_ids",
    "streaming_position_ids",
    "text_position_ids",
    "time_interval",
]


def time_interval(tokens_per_second: float, second_per_grid: float) -> torch.Tensor:
    """Temporal mRoPE step between consecutive frame groups, computed as get_rope_index does
    (a float32 scalar: `tokens_per_second * second_per_grid_ts`)."""
    return torch.tensor(float(second_per_grid), dtype=torch.float32) * tokens_per_second


def frame_position_ids(
    base: int,
    group_index: int,
    grid: tuple[int, int],
    interval: torch.Tensor | float,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """(3, th*tw) positions of frame group `group_index` (row-major tokens)."""
    th, tw = (int(v) for v in grid)
    t = (torch.tensor([int(group_index)], device=device) * interval).long() + int(base)
    hh = torch.arange(th, device=device) + int(base)
    ww = torch.arange(tw, device=device) + int(base)
    T, H, W = torch.meshgrid(t, hh, ww, indexing="ij")
    return torch.stack([T, H, W]).reshape(3, -1)


def text_position_ids(base: int, start: int, n: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(3, n) positions base+start .. base+start+n-1, the same on all three axes."""
    return (torch.arange(n, device=device) + int(base) + int(start)).view(1, -1).expand(3, -1).clone()


def streaming_position_ids(
    segments: Sequence[Segment],
    interval: torch.Tensor | float = 1.0,
    reasoning_base: int | None = None,
    vision_base: int | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """(3, L) long position ids of a streaming sequence (see the module docstring).

    interval: temporal step per frame group (`time_interval`). reasoning_base / vision_base:
    R0 / V0, default P = total prompt length.
    """
    P = sum(s.length for s in segments if s.kind == PROMPT)
    R0 = P if reasoning_base is None else int(reasoning_base)
    V0 = P if vision_base is None else int(vision_base)
    parts: list[torch.Tensor] = []
    n_prompt = n_text = n_frames = 0
    for s in segments:
        if s.kind == PROMPT:
            parts.append(text_position_ids(0, n_prompt, s.length, device))
            n_prompt += s.length
        elif s.kind == TEXT:
            parts.append(text_position_ids(R0, n_text, s.length, device))
            n_text += s.length
        elif s.kind == FRAME:
            if s.grid is None:
                raise ValueError("frame segments need a grid (tokens high, tokens wide) for positions")
            g = n_frames if s.index is None else int(s.index)
            parts.append(frame_position_ids(V0, g, s.grid, interval, device))
            n_frames += 1
    if not parts:
        return torch.zeros(3, 0, dtype=torch.long, device=device)
    return torch.cat(parts, dim=1)
