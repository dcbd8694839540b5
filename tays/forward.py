"""One full forward over a streaming sequence: the streaming mask + decoupled positions fed to
the model's own decoder (for training, for a one-shot prefill, and as the engine's oracle).

    seq = StreamingSequence(vlm)
    seq.add_prompt(prompt_ids)
    seq.add_frames(frames_0_1, time=1.0)        # one frame group (temporal_patch_size frames)
    seq.add_text(reasoning_ids, time=1.0)       # sees the prompt and frame groups with time <= 1.0
    logits = streaming_forward(vlm, seq)        # (1, L, vocab), differentiable

The decoder is transformers' own (`model.model.language_model`, sdpa or eager as loaded): we
hand it `inputs_embeds`, 3-D `position_ids` (3, 1, L) and the 4-D additive mask, passed as an
already-prepared ``{layer_type: mask}`` dict so transformers uses it as is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from tays.mask import FRAME, PROMPT, TEXT, Segment, additive_mask, streaming_mask
from tays.positions import streaming_position_ids, time_interval
from vstream.model import VLM, VLMError

__all__ = ["StreamingSequence", "check_supported", "encode_frames", "streaming_forward", "video_interval"]

SUPPORTED_ARCHS = ("qwen2_5_vl",)


def check_supported(vlm: VLM) -> None:
    if vlm.arch not in SUPPORTED_ARCHS:
        raise VLMError(
            f"TaYS streaming supports {', '.join(SUPPORTED_ARCHS)} for now, not {vlm.arch!r} "
            "(Qwen3-VL needs DeepStack injection and timestamp tokens per frame group)"
        )


def video_interval(vlm: VLM, fps: float) -> torch.Tensor:
    """Temporal mRoPE step between frame groups for frames sampled at `fps`."""
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    tps = getattr(vlm.model.config.vision_config, "tokens_per_second", 1)
    return time_interval(tps, vlm.temporal_patch_size / float(fps))


def encode_frames(vlm: VLM, frames: Sequence[Any]) -> tuple[torch.Tensor, tuple[int, int]]:
    """Vision-tower features of ONE frame group: (th*tw, hidden) on the model's device/dtype and
    the (th, tw) token grid. `frames` holds 1..temporal_patch_size frames (a short group is
    padded by repeating its last frame, as transformers does for odd videos).

    Qwen2.5-VL's vision tower attends within each temporal group only, so encoding groups one by
    one equals encoding the whole video at once (tests check this)."""
    frames = list(frames)
    if not 1 <= len(frames) <= vlm.temporal_patch_size:
        raise ValueError(f"a frame group holds 1..{vlm.temporal_patch_size} frames, got {len(frames)}")
    pv, grid, *_ = vlm.video_patches(frames)
    g, th, tw = grid
    visual = vlm.model.model.visual
    grid_thw = torch.tensor([[g, th * vlm.merge_size, tw * vlm.merge_size]], dtype=torch.long, device=vlm.device)
    out = visual(pv.to(device=vlm.device, dtype=visual.dtype), grid_thw=grid_thw)
    emb = out.pooler_output if hasattr(out, "pooler_output") else out
    return emb.to(vlm.dtype), (th, tw)


class StreamingSequence:
    """Segments plus their input embeddings, in the order they are added."""

    def __init__(self, vlm: VLM):
        check_supported(vlm)
        self.vlm = vlm
        self.segments: list[Segment] = []
        self.embeds: list[torch.Tensor] = []  # (n, hidden) each
        self.token_ids: list[torch.Tensor | None] = []  # text/prompt ids (None for frames)

    def _embed(self, ids: Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.vlm.device).reshape(-1)
        return ids, self.vlm.model.get_input_embeddings()(ids)

    def add_prompt(self, ids: Sequence[int] | torch.Tensor) -> Segment:
        ids, e = self._embed(ids)
        return self._add(Segment(PROMPT, len(ids)), e, ids)

    def add_text(self, ids: Sequence[int] | torch.Tensor, time: float = 0.0, frames_seen: int | None = None) -> Segment:
        ids, e = self._embed(ids)
        return self._add(Segment(TEXT, len(ids), time=float(time), frames_seen=frames_seen), e, ids)

    def add_frames(self, frames: Sequence[Any], time: float, index: int | None = None) -> Segment:
        """One frame group from raw frames (PIL images / arrays)."""
        e, grid = encode_frames(self.vlm, frames)
        return self.add_frame_embeds(e, grid, time, index)

    def add_frame_embeds(
        self, embeds: torch.Tensor, grid: tuple[int, int], time: float, index: int | None = None
    ) -> Segment:
        return self._add(Segment(FRAME, embeds.shape[0], time=float(time), grid=tuple(grid), index=index), embeds, None)

    def _add(self, seg: Segment, e: torch.Tensor, ids: torch.Tensor | None) -> Segment:
        self.segments.append(seg)
        self.embeds.append(e)
        self.token_ids.append(ids)
        return seg

    def __len__(self) -> int:
        return sum(s.length for s in self.segments)


def streaming_forward(
    vlm: VLM,
    seq: StreamingSequence,
    fps: float = 2.0,
    visual_window: int | None = None,
    reasoning_base: int | None = None,
    vision_base: int | None = None,
    return_hidden: bool = False,
) -> torch.Tensor:
    """(1, L, vocab) logits (or (1, L, hidden) final hidden states) of one full forward over `seq`
    with the streaming mask and decoupled positions. Keeps the autograd graph (training)."""
    check_supported(vlm)
    model = vlm.model
    lm = model.model.language_model
    dev = vlm.device
    embeds = torch.cat([e.to(vlm.dtype) for e in seq.embeds], dim=0)[None]
    pos = streaming_position_ids(seq.segments, video_interval(vlm, fps), reasoning_base, vision_base, device=dev)
    mask = additive_mask(streaming_mask(seq.segments, visual_window, device=dev), dtype=vlm.dtype)
    layer_types = set(getattr(lm.config, "layer_types", None) or ["full_attention"])
    out = lm(
        inputs_embeds=embeds, position_ids=pos[:, None], attention_mask={t: mask for t in layer_types}, use_cache=False
    )
    h = out.last_hidden_state
    return h if return_hidden else model.lm_head(h)
