"""A tokenized prompt plus where every vision token sits; the pixel geometry of tokens."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from PIL import Image

from vstream.model.errors import VLMError


@dataclass
class VLMInputs:
    """A tokenized prompt plus where every vision token sits, for one forward/generate call.

    `model_kwargs` goes straight into `model(**...)` / `model.generate(**...)`. Boxes are
    x0, y0, x1, y1 in the ORIGINAL (pre-normalisation) image's pixel coordinates, row-major,
    in the same order as the positions, so attribution over tokens can be drawn on the image.
    """

    model_kwargs: dict[str, torch.Tensor]
    prompt: str  # chat-templated text before pad expansion (for display/debugging)
    image_token_positions: torch.Tensor  # (N,) long, sequence positions of image pads
    token_grid: tuple[int, int] | None = None  # (tokens high, tokens wide)
    token_boxes: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 4))
    resized_size: tuple[int, int] | None = None  # (w, h) the processor resized to
    image: Image.Image | None = None  # normalised RGB image
    original_size: tuple[int, int] | None = None  # (w, h) of the image as given
    # video (all empty / None without a video)
    video_token_positions: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    video_frame_groups: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    video_grid: tuple[int, int, int] | None = None  # (frame groups, tokens high, tokens wide)
    video_token_boxes: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 4))
    video_resized_size: tuple[int, int] | None = None
    video_original_size: tuple[int, int] | None = None
    frames: list[Image.Image] = field(default_factory=list)  # normalised frames (before padding)
    video_timestamps: list[float] = field(default_factory=list)  # seconds, one per frame group

    @property
    def input_ids(self) -> torch.Tensor:
        return self.model_kwargs["input_ids"]

    @property
    def prompt_len(self) -> int:
        return int(self.model_kwargs["input_ids"].shape[1])

    def teacher_forced(self, generated_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """`model(**kw)` arguments over prompt + a generated trace, one sequence: the trace's
        tokens appended to `input_ids`, `attention_mask` and `mm_token_type_ids` (as text)."""
        kw = dict(self.model_kwargs)
        ids = kw["input_ids"]
        gen = torch.as_tensor(generated_ids).reshape(1, -1).to(device=ids.device, dtype=ids.dtype)
        kw["input_ids"] = torch.cat([ids, gen], dim=1)
        kw["attention_mask"] = torch.ones_like(kw["input_ids"])
        if "mm_token_type_ids" in kw:
            mm = kw["mm_token_type_ids"]
            kw["mm_token_type_ids"] = torch.cat([mm, torch.zeros_like(gen, dtype=mm.dtype)], dim=1)
        return kw


def token_boxes(th: int, tw: int, ppt: int, resized: tuple[int, int], orig: tuple[int, int]) -> torch.Tensor:
    """Row-major (th*tw, 4) boxes of each LLM token, mapped from resized to original pixels."""
    sx, sy = orig[0] / resized[0], orig[1] / resized[1]
    ys, xs = torch.meshgrid(torch.arange(th), torch.arange(tw), indexing="ij")
    xs, ys = xs.flatten().float(), ys.flatten().float()
    boxes = torch.stack([xs * ppt * sx, ys * ppt * sy, (xs + 1) * ppt * sx, (ys + 1) * ppt * sy], dim=1)
    return boxes


def group_timestamps(n_frames: int, fps: float, tp: int) -> list[float]:
    """Mid time (s) of each temporal group of `tp` frames, as Qwen3-VL's processor computes it."""
    if not fps > 0:
        raise VLMError(f"fps must be > 0, got {fps}")
    idx = list(range(n_frames))
    idx += [idx[-1]] * (-n_frames % tp)
    t = [i / fps for i in idx]
    return [(t[i] + t[i + tp - 1]) / 2 for i in range(0, len(t), tp)]
