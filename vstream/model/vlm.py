"""The one place that talks to a vision-language model.

Everything else in vstream (live attribution, TaYS streaming, the demo trainer, the UI) goes
through `load_vlm` / `VLM`, so architecture quirks live here only:

* Qwen2-VL, Qwen2.5-VL (also MiMo-VL, Cosmos-Reason1), Qwen3-VL (incl. MoE / Thinking) and
  GLM-4.1V-Thinking (`glm4v`: images only; its videos are frames of image tokens between
  timestamps, a layout `build_inputs` does not write yet). Per-family facts live in
  `vstream.model.families`.
* We run the image processor and the chat template ourselves instead of transformers'
  `*Processor` classes: those need torchvision (absent here) for video, and we need the exact
  placement of every vision token anyway (attribution maps tokens back to image boxes).
* transformers 5.x computes multimodal RoPE positions only when `mm_token_type_ids`
  (0 text, 1 image, 2 video) is passed; Qwen2/2.5-VL silently fall back to 1-D positions
  without it (wrong outputs), Qwen3-VL raises. `build_inputs` always provides it.
* The model object keeps `rope_deltas` state between calls, so generation/forward passes
  on one model must not interleave: use `VLM.lock` around your own forward passes.

The library never imports gradio and only loads safetensors weights.
"""

from __future__ import annotations

import copy
import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

if TYPE_CHECKING:  # the transformers classes only annotate here; importing them costs start-up time
    from transformers import PreTrainedModel, PreTrainedTokenizerBase
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

from vstream.model.decoding import IncrementalDecoder, event_stop, token_streamer
from vstream.model.errors import VLMError
from vstream.model.families import family_of
from vstream.model.images import normalize_image_with_size
from vstream.model.inputs import VLMInputs, group_timestamps, token_boxes

# model_type -> transformers class name (resolved lazily: not every version has all of them)
SUPPORTED_MODEL_TYPES: dict[str, str] = {
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
    "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration",
    "glm4v": "Glm4vForConditionalGeneration",
}
_QWEN3_FAMILY = {"qwen3_vl", "qwen3_vl_moe"}


# ----------------------------------------------------------------------------------------------
# the adapter


@dataclass
class VLM:
    """A loaded model with its tokenizer and image processor, plus the few facts callers need."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    image_processor: Qwen2VLImageProcessorPil
    arch: str  # config.model_type
    device: torch.device
    dtype: torch.dtype
    # serialises generate/forward on this model (the model caches rope_deltas between calls)
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False, compare=False)
    path: Path | None = None  # the folder it was loaded from (training.json etc. live there)

    def __repr__(self) -> str:  # the default dumps the whole module tree
        return f"VLM(arch={self.arch!r}, device={str(self.device)!r}, dtype={self.dtype}, layers={self.num_layers})"

    # -- facts ---------------------------------------------------------------------------------
    @property
    def patch_size(self) -> int:
        return int(self.image_processor.patch_size)

    @property
    def merge_size(self) -> int:
        return int(self.image_processor.merge_size)

    @property
    def temporal_patch_size(self) -> int:
        return int(self.image_processor.temporal_patch_size)

    @property
    def pixels_per_token(self) -> int:
        """Side of the square of resized-image pixels one LLM token covers (28 or 32)."""
        return self.patch_size * self.merge_size

    @property
    def text_config(self) -> Any:
        return getattr(self.model.config, "text_config", self.model.config)

    @property
    def base_model(self) -> torch.nn.Module:
        """The multimodal base model (Qwen*VLModel: vision tower, decoder, `get_rope_index`)
        under the generation head: what ablation and streaming drive directly."""
        inner = getattr(self.model, "model", None)
        if inner is None or not hasattr(inner, "get_rope_index"):
            raise RuntimeError(f"unsupported model layout: {type(self.model).__name__} has no multimodal base model")
        return inner

    @property
    def language_model(self) -> torch.nn.Module:
        """The text decoder, which takes `inputs_embeds` with the image features already in."""
        lm = getattr(getattr(self.model, "model", None), "language_model", None)
        if lm is None:
            raise RuntimeError(
                f"cannot find the language model of {type(self.model).__name__} (model.model.language_model)"
            )
        return lm

    @property
    def num_layers(self) -> int:
        return int(self.text_config.num_hidden_layers)

    @property
    def num_heads(self) -> int:
        return int(self.text_config.num_attention_heads)

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    @property
    def video_token_id(self) -> int:
        return int(self.model.config.video_token_id)

    @property
    def eos_token_ids(self) -> list[int]:
        """Generation stops at any of these: generation_config's eos (often a list) + tokenizer's."""
        ids: list[int] = []
        gc_eos = getattr(self.model.generation_config, "eos_token_id", None)
        for e in (gc_eos if isinstance(gc_eos, (list, tuple)) else [gc_eos]) + [self.tokenizer.eos_token_id]:
            if e is not None and int(e) not in ids:
                ids.append(int(e))
        return ids

    # -- inputs --------------------------------------------------------------------------------
    def build_inputs(
        self,
        question: str,
        image: Any = None,
        video: Sequence[Any] | None = None,
        system: str | None = None,
        assistant_prefix: str = "",
        fps: float = 2.0,
    ) -> VLMInputs:
        """Chat-template `question` with an optional image and/or video (list of frames).

        The template's single pad per image/video is expanded to one pad per LLM token, and
        `mm_token_type_ids` is added so the model computes multimodal RoPE. `fps` is the
        sampling rate of `video` frames (temporal RoPE spacing on Qwen2.5-VL, timestamps on
        Qwen3-VL). `assistant_prefix` is appended after the generation prompt (e.g. to force
        the start of the answer).
        """
        if not isinstance(question, str):
            raise VLMError(f"question must be a string, got {type(question).__name__}")
        tok = self.tokenizer
        image_pad = tok.convert_ids_to_tokens(self.image_token_id)
        video_pad = tok.convert_ids_to_tokens(self.video_token_id)
        for pad in (image_pad, video_pad):
            if pad in question or (system and pad in system) or pad in assistant_prefix:
                raise VLMError(f"the text must not contain the placeholder token {pad}")
        if video is not None and not family_of(self.arch).video:
            raise VLMError(f"video input is not supported for {self.arch} models yet (images and text are)")
        if video is not None:
            is_array_clip = isinstance(video, np.ndarray) and video.ndim == 4  # (T, H, W, C)
            if (isinstance(video, (str, bytes, Image.Image, np.ndarray)) and not is_array_clip) or len(video) == 0:
                raise VLMError("video must be a non-empty list of frames (PIL images or HxWx3 arrays)")

        prompt, ids = self._template_ids(question, image is not None, video is not None, system, assistant_prefix)
        out = VLMInputs(model_kwargs={}, prompt=prompt, image_token_positions=torch.zeros(0, dtype=torch.long))
        kwargs: dict[str, torch.Tensor] = {}
        if image is not None:
            ids = self._expand_image(ids, image, out, kwargs)
        if video is not None:
            ids = self._expand_video(ids, video, fps, out, kwargs)

        input_ids = torch.tensor([ids], dtype=torch.long)
        mm = torch.zeros_like(input_ids)
        mm[input_ids == self.image_token_id] = 1
        mm[input_ids == self.video_token_id] = 2
        out.image_token_positions = (input_ids[0] == self.image_token_id).nonzero().flatten()
        out.video_token_positions = (input_ids[0] == self.video_token_id).nonzero().flatten()
        kwargs = {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "mm_token_type_ids": mm,
            **kwargs,
        }
        out.model_kwargs = {k: v.to(self.device) for k, v in kwargs.items()}
        return out

    def _template_ids(
        self, question: str, has_image: bool, has_video: bool, system: str | None, assistant_prefix: str
    ) -> tuple[str, list[int]]:
        """The chat-templated prompt and its ids, with one placeholder per image / video."""
        tok = self.tokenizer
        content: list[dict[str, str]] = []
        if has_image:
            content.append({"type": "image"})
        if has_video:
            content.append({"type": "video"})
        content.append({"type": "text", "text": question})
        messages: list[dict[str, Any]] = []
        if system is not None:
            messages.append({"role": "system", "content": system})
        messages.append({"role": "user", "content": content})
        try:
            prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as e:
            raise VLMError(f"the tokenizer's chat template failed: {type(e).__name__}: {e}") from e
        prompt = prompt + assistant_prefix
        ids: list[int] = tok(prompt, add_special_tokens=False)["input_ids"]

        n_img, n_vid = ids.count(self.image_token_id), ids.count(self.video_token_id)
        if n_img != has_image or n_vid != has_video:
            raise VLMError(
                f"chat template produced {n_img} image and {n_vid} video placeholders "
                f"(expected {int(has_image)} and {int(has_video)})"
            )
        return prompt, ids

    def _expand_image(self, ids: list[int], image: Any, out: VLMInputs, kwargs: dict[str, torch.Tensor]) -> list[int]:
        """One image pad per LLM token; the image's tensors go into `kwargs`, its geometry into `out`."""
        img, orig = normalize_image_with_size(image)
        proc = self.image_processor(images=[img], return_tensors="pt")
        t, gh, gw = (int(v) for v in proc["image_grid_thw"][0])
        th, tw = gh // self.merge_size, gw // self.merge_size
        resized = (gw * self.patch_size, gh * self.patch_size)
        k = ids.index(self.image_token_id)
        ids[k : k + 1] = [self.image_token_id] * (t * th * tw)
        kwargs["pixel_values"] = proc["pixel_values"]
        kwargs["image_grid_thw"] = proc["image_grid_thw"].long()
        out.token_grid, out.resized_size, out.image, out.original_size = (th, tw), resized, img, orig
        out.token_boxes = token_boxes(th, tw, self.pixels_per_token, resized, orig)
        return ids

    def _expand_video(
        self, ids: list[int], video: Sequence[Any], fps: float, out: VLMInputs, kwargs: dict[str, torch.Tensor]
    ) -> list[int]:
        """One video pad per LLM token of every frame group (on Qwen3-VL each group with its timestamp)."""
        tok = self.tokenizer
        pv, grid, frames, vorig, vresized = self.video_patches(video)
        g, th, tw = grid
        per_group = th * tw
        times = group_timestamps(len(frames), fps, self.temporal_patch_size)
        k = ids.index(self.video_token_id)
        if self.arch in _QWEN3_FAMILY:
            # Qwen3-VL: each frame group is "<t seconds><vision_start>pads<vision_end>", and
            # get_rope_index splits video_grid_thw per group to match
            start_id = int(self.model.config.vision_start_token_id)
            end_id = int(self.model.config.vision_end_token_id)
            lo, hi = k, k + 1
            if k > 0 and k + 1 < len(ids) and ids[k - 1] == start_id and ids[k + 1] == end_id:
                lo, hi = k - 1, k + 2
            seq: list[int] = []
            for ts in times:
                seq += tok(f"<{ts:.1f} seconds>", add_special_tokens=False)["input_ids"]
                seq += [start_id] + [self.video_token_id] * per_group + [end_id]
            ids[lo:hi] = seq
        else:
            ids[k : k + 1] = [self.video_token_id] * (g * per_group)
        kwargs["pixel_values_videos"] = pv
        kwargs["video_grid_thw"] = torch.tensor([[g, th * self.merge_size, tw * self.merge_size]], dtype=torch.long)
        if self.arch == "qwen2_5_vl":
            kwargs["second_per_grid_ts"] = torch.tensor([self.temporal_patch_size / fps], dtype=torch.float32)
        out.video_grid, out.frames, out.video_timestamps = grid, frames, times
        out.video_original_size, out.video_resized_size = vorig, vresized
        out.video_frame_groups = torch.arange(g).repeat_interleave(per_group)
        out.video_token_boxes = token_boxes(th, tw, self.pixels_per_token, vresized, vorig).repeat(g, 1)
        return ids

    def video_patches(
        self, video: Sequence[Any]
    ) -> tuple[torch.Tensor, tuple[int, int, int], list[Image.Image], tuple[int, int], tuple[int, int]]:
        """pixel_values_videos without torchvision.

        Each frame goes through the image processor (same resize/rescale/normalize as images);
        its output repeats the frame `temporal_patch_size` times per patch, so we keep one copy
        and re-stack consecutive frames instead, in the video processor's (C, T, ph, pw) patch
        layout. An odd frame count is padded by repeating the last frame, like transformers.
        """
        frames, sizes = [], []
        for i, f in enumerate(video):
            try:
                img, orig = normalize_image_with_size(f)
            except VLMError as e:
                raise VLMError(f"video frame {i}: {e}") from e
            frames.append(img)
            sizes.append((img.size, orig))
        if len({s for s, _ in sizes}) != 1:
            raise VLMError(f"all video frames must have the same size, got {sorted({s for s, _ in sizes})}")
        proc = self.image_processor(images=frames, return_tensors="np")
        grids = np.asarray(proc["image_grid_thw"])
        _, gh, gw = (int(v) for v in grids[0])
        n = gh * gw
        c, tp, p = 3, self.temporal_patch_size, self.patch_size
        pv = np.asarray(proc["pixel_values"], dtype=np.float32).reshape(len(frames), n, c, tp, p, p)[:, :, :, 0]
        if pad := -len(frames) % tp:
            pv = np.concatenate([pv, np.repeat(pv[-1:], pad, axis=0)], axis=0)
        g = pv.shape[0] // tp
        pv = pv.reshape(g, tp, n, c, p, p).transpose(0, 2, 3, 1, 4, 5).reshape(g * n, c * tp * p * p)
        grid = (g, gh // self.merge_size, gw // self.merge_size)
        resized = (gw * p, gh * p)
        return torch.from_numpy(np.ascontiguousarray(pv)), grid, frames, sizes[0][1], resized

    # -- generation ----------------------------------------------------------------------------
    def generation_kwargs(self, max_new_tokens: int, do_sample: bool, temperature: float) -> dict[str, Any]:
        """One GenerationConfig (the model's own, e.g. its repetition_penalty, with our overrides);
        transformers 5 deprecates mixing a config object with loose generation kwargs."""
        if int(max_new_tokens) < 1:
            raise VLMError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        gc = copy.deepcopy(self.model.generation_config)
        eos = self.eos_token_ids
        gc.max_new_tokens = int(max_new_tokens)
        gc.max_length = None
        gc.do_sample = bool(do_sample)
        gc.eos_token_id = eos
        gc.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos[0]
        if do_sample:
            if not temperature > 0:
                raise VLMError(f"temperature must be > 0 when sampling, got {temperature}")
            gc.temperature = float(temperature)
        else:  # the model's sampling defaults only trigger warnings under greedy decoding
            gc.temperature, gc.top_p, gc.top_k = None, None, None
        return {"generation_config": gc}

    def stream(
        self,
        inputs: VLMInputs,
        max_new_tokens: int = 256,
        do_sample: bool = False,
        temperature: float = 1.0,
        stop_event: threading.Event | None = None,
    ) -> Iterator[tuple[int, str]]:
        """Yield (token_id, text piece) for each new token while the model generates.

        Generation runs in a background thread so the UI can show tokens as they come. It ends
        at eos (not yielded), at `max_new_tokens`, when `stop_event` is set, or when the
        consumer closes this generator; in every case the thread is joined before returning.
        Text pieces concatenate to the decoded output (special tokens such as <think> kept;
        a piece may be "" while a multi-byte character is incomplete).
        """
        if stop_event is not None and stop_event.is_set():
            return
        kw = self.generation_kwargs(max_new_tokens, do_sample, temperature)
        q: queue.Queue = queue.Queue()
        closed = threading.Event()
        from transformers import StoppingCriteriaList

        kw["stopping_criteria"] = StoppingCriteriaList([event_stop(closed, stop_event)])
        kw["streamer"] = token_streamer(q.put)

        def work() -> None:
            try:
                with self.lock:
                    self.model.generate(**inputs.model_kwargs, **kw)
            except BaseException as e:  # re-raised in the consumer
                q.put(e)
            finally:
                q.put(_END)

        worker = threading.Thread(target=work, name="vstream-generate", daemon=True)
        worker.start()
        decoder = IncrementalDecoder(self.tokenizer)
        eos = set(self.eos_token_ids)
        try:
            while True:
                item = q.get()
                if item is _END:
                    break
                if isinstance(item, BaseException):
                    raise item
                for tid in item:
                    if stop_event is not None and stop_event.is_set():
                        return  # tokens the thread made ahead of the consumer are dropped
                    if tid in eos:
                        continue
                    yield tid, decoder.push(tid)
        finally:
            closed.set()
            worker.join()

    def generate_text(self, inputs: VLMInputs, max_new_tokens: int = 256) -> str:
        """Greedy-decode and return the new text (special tokens kept, eos dropped)."""
        kw = self.generation_kwargs(max_new_tokens, False, 1.0)
        with self.lock:
            out = self.model.generate(**inputs.model_kwargs, **kw)
        new = out[0, inputs.prompt_len :].tolist()
        drop = set(self.eos_token_ids) | {kw["generation_config"].pad_token_id}
        while new and new[-1] in drop:
            new.pop()
        return self.tokenizer.decode(new, skip_special_tokens=False, clean_up_tokenization_spaces=False)


_END = object()
