"""KV caches: per-layer key/value buffers, and the TaYS video cache built on them.

A chunk of tokens is written in two moves: the layer loop `put`s each layer's K/V past the
committed tokens (where no reader looks), then `advance` commits the chunk. Buffers are
preallocated as (1, kv_heads, capacity, head_dim) per layer and replaced, never resized in place,
when more room is needed: a reader still holding the old buffers keeps them alive and valid.

The video cache holds the prompt and then one frame group after another. With a visual window of
W groups, a reader sees the prompt + the newest W groups and a new group attends to the prompt +
the W-1 groups before it. Groups that left the window stay in the buffer (unseen) until it is
full; then the prompt and the groups still visible are compacted into fresh buffers of twice
their size, so memory stays bounded and the copying is amortised.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

__all__ = ["FrameGroup", "KVCache", "KVSpec", "VideoCache", "VideoView"]


@dataclass(frozen=True)
class KVSpec:
    """The shape of one model's K/V: what a cache allocates."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device


class KVCache:
    """Per-layer K/V buffers, filled from the front; they grow to twice what is needed when full."""

    def __init__(self, spec: KVSpec, initial_capacity: int):
        self.spec = spec
        self.initial_capacity = initial_capacity
        self.keys: list[torch.Tensor] = []  # per layer (1, Hkv, capacity, D)
        self.values: list[torch.Tensor] = []
        self.capacity = 0
        self.length = 0  # committed tokens

    def reserve(self, extra: int) -> bool:
        """Room for `extra` more tokens. True if the buffers were replaced."""
        if self.length + extra <= self.capacity:
            return False
        self.reallocate(max(self.initial_capacity, 2 * (self.length + extra)), [(0, self.length)])
        return True

    def reallocate(self, capacity: int, keep: Sequence[tuple[int, int]]) -> None:
        """Fresh buffers of `capacity` tokens holding the `keep` token ranges, back to back."""
        s = self.spec
        shape = (1, s.kv_heads, capacity, s.head_dim)
        keys = [torch.empty(shape, dtype=s.dtype, device=s.device) for _ in range(s.layers)]
        values = [torch.empty(shape, dtype=s.dtype, device=s.device) for _ in range(s.layers)]
        n = 0
        for a, b in keep:
            if b > a:
                for li in range(len(self.keys)):
                    keys[li][:, :, n : n + b - a] = self.keys[li][:, :, a:b]
                    values[li][:, :, n : n + b - a] = self.values[li][:, :, a:b]
            n += b - a
        self.keys, self.values, self.capacity, self.length = keys, values, capacity, n

    def put(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write one layer's (1, Hkv, n, D) K/V right after the committed tokens (not committed)."""
        n = self.length
        self.keys[layer][:, :, n : n + k.shape[-2]] = k
        self.values[layer][:, :, n : n + v.shape[-2]] = v

    def put_stacked(self, kv: torch.Tensor) -> None:
        """`put` for every layer from (2 * layers, Hkv, n, D): the keys, then the values."""
        L = self.spec.layers
        for li in range(L):
            self.put(li, kv[li][None], kv[L + li][None])

    def advance(self, n: int) -> None:
        """Commit the `n` tokens put last."""
        self.length += n

    def segment(self, layer: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of one layer's keys and values over tokens [start, end)."""
        return self.keys[layer][:, :, start:end], self.values[layer][:, :, start:end]

    def stacked(self, start: int, end: int) -> torch.Tensor:
        """(2 * layers, Hkv, end - start, D): every layer's keys over [start, end), then the values."""
        return torch.stack([k[0, :, start:end] for k in self.keys] + [v[0, :, start:end] for v in self.values])


class FrameGroup(NamedTuple):
    index: int  # absolute frame-group index since the stream began
    start: int  # first token in the buffers
    length: int  # tokens
    time: float  # stream time of the group (its last frame's)


@dataclass(frozen=True)
class VideoView:
    """What a decode step may read of the video cache: immutable, the same for every layer."""

    keys: tuple[torch.Tensor, ...]  # per layer (1, Hkv, capacity, D)
    values: tuple[torch.Tensor, ...]
    spans: tuple[tuple[int, int], ...]  # token ranges of the buffers that are visible
    n_groups: int  # frame groups committed so far (absolute count)
    first_group: int  # absolute index of the oldest visible group (== n_groups if none)
    time: float  # arrival time of the newest group (-inf if none)
    event: Any = None  # CUDA event the reader waits on
    groups: tuple[FrameGroup, ...] = ()  # the visible groups, oldest first (where each one's tokens are)

    @property
    def length(self) -> int:
        return sum(e - s for s, e in self.spans)


class VideoCache(KVCache):
    """The video stream's K/V: the prompt, then frame groups (module docstring). Written by one
    ingestion thread (or worker process) only; readers take a `view`."""

    def __init__(self, spec: KVSpec, initial_capacity: int, visual_window: int | None = None):
        super().__init__(spec, initial_capacity)
        self.visual_window = visual_window
        self.prompt_len = 0
        self.groups: list[FrameGroup] = []  # in the buffers, oldest first
        self.n_groups = 0  # groups committed since the stream began (evicted ones included)

    def begin(self, prompt_len: int) -> None:
        """Empty buffers with room for the prompt; `put` its K/V and `advance` next."""
        self.prompt_len = prompt_len
        self.groups, self.n_groups = [], 0
        self.reallocate(max(self.initial_capacity, 2 * prompt_len), [])

    def load_prompt(self, kv: torch.Tensor) -> None:
        """Start from a prompt computed elsewhere: kv (2 * layers, Hkv, P, D) as `stacked` gives."""
        P = int(kv.shape[2])
        self.begin(P)
        self.put_stacked(kv)
        self.advance(P)

    def add_group(self, index: int, length: int, time: float) -> None:
        """Commit the frame group just put (its K/V follow the committed tokens)."""
        self.groups.append(FrameGroup(index, self.length, length, time))
        self.n_groups = index + 1
        self.advance(length)

    def visible(self) -> list[FrameGroup]:
        """The groups a reader sees: all, or the newest W."""
        W = self.visual_window
        return self.groups if W is None else self.groups[-W:]

    def context_spans(self) -> list[tuple[int, int]]:
        """Token ranges a new group attends to (besides itself): the prompt + the W-1 groups before it."""
        W = self.visual_window
        return self.spans(self.groups if W is None else (self.groups[-(W - 1) :] if W > 1 else []))

    def spans(self, groups: Sequence[FrameGroup]) -> list[tuple[int, int]]:
        """The prompt + the given groups (contiguous, newest last) as at most two token ranges."""
        P = self.prompt_len
        if not groups:
            return [(0, P)]
        s, e = groups[0].start, groups[-1].start + groups[-1].length
        return [(0, e)] if s == P else [(0, P), (s, e)]

    def reserve(self, extra: int) -> bool:
        """Room for `extra` more tokens; else fresh buffers holding the prompt + the groups a reader
        may still need, with twice that room. True if the buffers were replaced."""
        if self.length + extra <= self.capacity:
            return False
        P, keep = self.prompt_len, self.visible()
        live = P + sum(g.length for g in keep)
        s = keep[0].start if keep else P
        self.reallocate(max(self.initial_capacity, 2 * (live + extra)), [(0, P)] + ([(s, self.length)] if keep else []))
        self.groups = [g._replace(start=g.start - (s - P)) for g in keep]
        return True

    def view(self, event: Any = None) -> VideoView:
        vis = self.visible()
        return VideoView(
            keys=tuple(self.keys),
            values=tuple(self.values),
            spans=tuple(self.spans(vis)),
            n_groups=self.n_groups,
            first_group=vis[0].index if vis else self.n_groups,
            time=vis[-1].time if vis else -math.inf,
            event=event,
            groups=tuple(vis),
        )
