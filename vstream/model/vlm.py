"""The one place that talks to a vision-language model.

Everything else in vstream (live attribution, TaYS streaming, the demo trainer, the UI) goes
through `load_vlm` / `VLM`, so architecture quirks live here only:

* Qwen2-VL, Qwen2.5-VL (also MiMo-VL, Cosmos-Reason1) and Qwen3-VL (incl. MoE / Thinking).
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
import json
import os
import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vstream.model.images import VLMError, normalize_image, normalize_image_with_size

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "VLM",
    "VLMError",
    "VLMInputs",
    "load_vlm",
    "normalize_image",
]

# model_type -> transformers class name (resolved lazily: not every version has all of them)
SUPPORTED_MODEL_TYPES: dict[str, str] = {
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
    "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration",
}
_QWEN3_FAMILY = {"qwen3_vl", "qwen3_vl_moe"}
_WEIGHT_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken"]


# ----------------------------------------------------------------------------------------------
# inputs


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


# ----------------------------------------------------------------------------------------------
# generation plumbing


class _QueueStreamer:
    """transformers streamer that forwards new token ids to a queue (the prompt is skipped)."""

    def __init__(self, q: queue.Queue):
        self.q = q
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first puts the whole prompt
            self.prompt_seen = True
            return
        self.q.put(value.reshape(-1).tolist())

    def end(self) -> None:
        pass  # the worker thread signals the end itself, also on errors


def _make_streamer(q: queue.Queue):
    # subclass lazily so importing this module does not import the generation stack
    from transformers.generation.streamers import BaseStreamer

    cls = type("QueueStreamer", (_QueueStreamer, BaseStreamer), {})
    return cls(q)


def _make_event_stop(*events: threading.Event | None):
    """StoppingCriteria that ends generation as soon as any of `events` is set."""
    from transformers import StoppingCriteria

    evs = [e for e in events if e is not None]

    class EventStop(StoppingCriteria):
        def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs) -> torch.BoolTensor:
            stop = any(e.is_set() for e in evs)
            return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)

    return EventStop()


class _IncrementalDecoder:
    """Decode token by token without splitting multi-byte characters.

    A token may end in the middle of a UTF-8 character (byte-level BPE); decoding it alone gives
    U+FFFD. We decode a short window and only emit text once it no longer ends in U+FFFD
    (the prefix/read offset scheme used by text-generation-inference), which is O(n) overall.
    """

    def __init__(self, tokenizer: Any):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        dec = lambda ids: self.tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        prefix_text = dec(self.ids[self.prefix : self.read])
        new_text = dec(self.ids[self.prefix :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return new_text[len(prefix_text) :]
        return ""


_END = object()


# ----------------------------------------------------------------------------------------------
# the adapter


@dataclass
class VLM:
    """A loaded model with its tokenizer and image processor, plus the few facts callers need."""

    model: Any
    tokenizer: Any
    image_processor: Any
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
        if video is not None:
            is_array_clip = isinstance(video, np.ndarray) and video.ndim == 4  # (T, H, W, C)
            if (isinstance(video, (str, bytes, Image.Image, np.ndarray)) and not is_array_clip) or len(video) == 0:
                raise VLMError("video must be a non-empty list of frames (PIL images or HxWx3 arrays)")

        content: list[dict[str, str]] = []
        if image is not None:
            content.append({"type": "image"})
        if video is not None:
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
        if n_img != (image is not None) or n_vid != (video is not None):
            raise VLMError(
                f"chat template produced {n_img} image and {n_vid} video placeholders "
                f"(expected {int(image is not None)} and {int(video is not None)})"
            )

        out = VLMInputs(model_kwargs={}, prompt=prompt, image_token_positions=torch.zeros(0, dtype=torch.long))
        kwargs: dict[str, torch.Tensor] = {}
        if image is not None:
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
            out.token_boxes = _token_boxes(th, tw, self.pixels_per_token, resized, orig)

        if video is not None:
            pv, grid, frames, vorig, vresized = self._video_patches(video)
            g, th, tw = grid
            per_group = th * tw
            times = _group_timestamps(len(frames), fps, self.temporal_patch_size)
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
            out.video_token_boxes = _token_boxes(th, tw, self.pixels_per_token, vresized, vorig).repeat(g, 1)

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

    def _video_patches(
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
    def _generate_kwargs(self, max_new_tokens: int, do_sample: bool, temperature: float) -> dict[str, Any]:
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
        kw = self._generate_kwargs(max_new_tokens, do_sample, temperature)
        q: queue.Queue = queue.Queue()
        closed = threading.Event()
        from transformers import StoppingCriteriaList

        kw["stopping_criteria"] = StoppingCriteriaList([_make_event_stop(closed, stop_event)])
        kw["streamer"] = _make_streamer(q)

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
        decoder = _IncrementalDecoder(self.tokenizer)
        eos = set(self.eos_token_ids)
        try:
            while True:
                item = q.get()
                if item is _END:
                    break
                if isinstance(item, BaseException):
                    raise item
                for tid in item:
                    if tid in eos:
                        continue
                    yield tid, decoder.push(tid)
        finally:
            closed.set()
            worker.join()

    def generate_text(self, inputs: VLMInputs, max_new_tokens: int = 256) -> str:
        """Greedy-decode and return the new text (special tokens kept, eos dropped)."""
        kw = self._generate_kwargs(max_new_tokens, False, 1.0)
        with self.lock:
            out = self.model.generate(**inputs.model_kwargs, **kw)
        new = out[0, inputs.prompt_len :].tolist()
        drop = set(self.eos_token_ids) | {kw["generation_config"].pad_token_id}
        while new and new[-1] in drop:
            new.pop()
        return self.tokenizer.decode(new, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _token_boxes(
    th: int, tw: int, ppt: int, resized: tuple[int, int], orig: tuple[int, int]
) -> torch.Tensor:
    """Row-major (th*tw, 4) boxes of each LLM token, mapped from resized to original pixels."""
    sx, sy = orig[0] / resized[0], orig[1] / resized[1]
    ys, xs = torch.meshgrid(torch.arange(th), torch.arange(tw), indexing="ij")
    xs, ys = xs.flatten().float(), ys.flatten().float()
    boxes = torch.stack([xs * ppt * sx, ys * ppt * sy, (xs + 1) * ppt * sx, (ys + 1) * ppt * sy], dim=1)
    return boxes


def _group_timestamps(n_frames: int, fps: float, tp: int) -> list[float]:
    """Mid time (s) of each temporal group of `tp` frames, as Qwen3-VL's processor computes it."""
    if not fps > 0:
        raise VLMError(f"fps must be > 0, got {fps}")
    idx = list(range(n_frames))
    idx += [idx[-1]] * (-n_frames % tp)
    t = [i / fps for i in idx]
    return [(t[i] + t[i + tp - 1]) / 2 for i in range(0, len(t), tp)]


# ----------------------------------------------------------------------------------------------
# loading


def load_vlm(
    name_or_path: str,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "auto",
    trust_remote_code: bool = False,
) -> VLM:
    """Load a supported VLM from a local folder or a Hugging Face id (safetensors only).

    dtype "auto" = bfloat16 on CUDA, float32 otherwise; device "auto" = cuda if available.
    Every user-facing failure (missing path, offline hub id, unsupported architecture, no
    safetensors) is a one-line VLMError.
    """
    path = _resolve(str(name_or_path), trust_remote_code)
    raw = read_model_config(path)
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise VLMError(
            f"unsupported architecture {model_type!r} in {path}; supported model_types: "
            + ", ".join(SUPPORTED_MODEL_TYPES)
        )
    if not any(path.glob("*.safetensors")):
        found = sorted({p.name for pat in ("*.bin", "*.pt", "*.pth", "*.ckpt") for p in path.glob(pat)})
        raise VLMError(
            f"no .safetensors weights in {path}"
            + (f" (found {', '.join(found[:3])})" if found else "")
            + "; only safetensors are loaded (never pickled .bin/.pt): convert the checkpoint first"
        )
    if not (path / "preprocessor_config.json").is_file():
        raise VLMError(f"{path} has no preprocessor_config.json (the image processor settings)")

    dev = _resolve_device(device)
    dt = _resolve_dtype(dtype, dev)
    remote = {"trust_remote_code": True} if trust_remote_code else {}

    import transformers
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    cls_name = SUPPORTED_MODEL_TYPES[model_type]
    cls = getattr(transformers, cls_name, None)
    if trust_remote_code and raw.get("auto_map"):
        cls = transformers.AutoModelForImageTextToText
    if cls is None:
        raise VLMError(f"transformers {transformers.__version__} has no {cls_name}; upgrade transformers")
    load_kw: dict[str, Any] = dict(dtype=dt, attn_implementation="sdpa", use_safetensors=True, **remote)
    if dev.type == "cuda":
        load_kw["device_map"] = str(dev)
    try:
        model = cls.from_pretrained(str(path), **load_kw)
        if dev.type != "cuda":
            model = model.to(dev)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        raise VLMError(f"could not load model weights from {path}: {type(e).__name__}: {_first_line(e)}") from e
    model.eval()

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), **remote)
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(str(path))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise VLMError(f"could not load tokenizer/image processor from {path}: {_first_line(e)}") from e
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = _find_chat_template(path)

    vc = model.config.vision_config
    for name, want in (("patch_size", vc.patch_size), ("merge_size", vc.spatial_merge_size),
                       ("temporal_patch_size", vc.temporal_patch_size)):
        have = getattr(image_processor, name)
        if int(have) != int(want):
            raise VLMError(f"{path}: preprocessor_config {name}={have} does not match the model's {want}")

    return VLM(model=model, tokenizer=tokenizer, image_processor=image_processor,
               arch=model_type, device=dev, dtype=dt, path=path)


def read_model_config(path: Path, what: str = "model") -> dict:
    """config.json of a model folder as a dict, or a one-line VLMError."""
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise VLMError(f"{path} has no config.json: not a {what} folder")
    try:
        return json.loads(cfg_file.read_text())
    except (OSError, ValueError) as e:
        raise VLMError(f"could not read {cfg_file}: {e}") from e


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


def _resolve(name: str, trust_remote_code: bool) -> Path:
    """Local folder as is; otherwise a hub id downloaded (or found in the cache) to a folder."""
    p = Path(name).expanduser()
    if p.exists():
        if not p.is_dir():
            raise VLMError(f"model path is not a folder: {p}")
        return p
    looks_like_path = (
        name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") != 1 or name.endswith("/")
    )
    if not looks_like_path:
        from huggingface_hub.utils import validate_repo_id

        try:
            validate_repo_id(name)
        except Exception:
            looks_like_path = True
    if looks_like_path:
        raise VLMError(f"model path does not exist: {name}")
    return _download(name, trust_remote_code)


def _download(repo_id: str, trust_remote_code: bool) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    offline = bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {
        "1", "true", "yes", "on"
    } or os.environ.get("TRANSFORMERS_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    patterns = _WEIGHT_PATTERNS + (["*.py"] if trust_remote_code else [])
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=offline))
    except (GatedRepoError, RepositoryNotFoundError) as e:
        raise VLMError(f"could not download {repo_id}: no such model on the Hugging Face Hub, or it is "
                       f"gated/private ({type(e).__name__}); pass a local path") from e
    except Exception as e:  # offline, no network, DNS, timeouts, cache misses
        why = "offline mode (HF_HUB_OFFLINE)" if offline else "no network"
        raise VLMError(f"could not download {repo_id}: {why} / not in local cache; pass a local path "
                       f"({type(e).__name__})") from e


def _find_chat_template(path: Path) -> str | None:
    """Real Qwen repos sometimes keep the template only for the processor."""
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    js = path / "chat_template.json"
    if js.is_file():
        try:
            return json.loads(js.read_text()).get("chat_template")
        except ValueError:
            return None
    return None


def _resolve_device(device: str | torch.device) -> torch.device:
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise VLMError(f"bad device {device!r}: {e}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise VLMError(f"device {device!r} requested but CUDA is not available")
    return dev


_DTYPES = {
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
}


def _resolve_dtype(dtype: str | torch.dtype, dev: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if dev.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise VLMError(f"unsupported dtype {dtype!r}; use auto, bfloat16, float16 or float32")
    return _DTYPES[dtype]
