"""Turn whatever the user hands us into a sane RGB PIL image before a VLM processor sees it.

Image processors assume 3-channel 8-bit input of a reasonable size; anything else (alpha,
palettes, 16-bit scans, float arrays, 1x1 icons, 8000 px photos, panoramas, broken uploads)
either crashes deep inside them or silently produces garbage. All of that is settled here, with
one-line `VLMError`s for what cannot be fixed. Nothing is ever unpickled: arrays must already
be numpy arrays, files are decoded by PIL only.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vstream.model.errors import VLMError

MIN_SIDE = 28  # one Qwen2.5-VL token; smaller images cannot be tiled into patches
MAX_SIDE = 2048  # long side cap before the processor (keeps its resize cheap)
MAX_ASPECT = 50.0  # beyond this the processor's smart_resize degenerates (1-token strips)
MAX_PIXELS = 100_000_000  # refuse decompression bombs and absurd scans

_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_HIGH_BIT_MODES = {"I", "F", "I;16", "I;16L", "I;16B", "I;16N"}
_RESIZE_FIRST = {"RGB", "RGBA", "L", "LA", "RGBX", "CMYK"}  # modes PIL resamples properly


def normalize_image(img: Any) -> Image.Image:
    """Return an RGB copy of `img` that any Qwen-style image processor can take.

    Accepts a PIL image of any mode, a numpy array (HxW, HxWxC with C in 1/2/3/4, or CxHxW;
    uint8/uint16/bool, or float in [0, 1]), a file path, bytes, or a binary file object.
    Transparency is composited on white. Images are refused when over 100 megapixels or more
    than 50:1; otherwise the long side is capped at 2048 px and both sides raised to >= 28 px,
    keeping the aspect ratio.
    """
    return normalize_image_with_size(img)[0]


def normalize_image_with_size(img: Any) -> tuple[Image.Image, tuple[int, int]]:
    """`normalize_image` plus the (w, h) of the image as given (after EXIF rotation), so
    callers can map token boxes back onto the user's original pixels."""
    if isinstance(img, Image.Image):
        pil = img
    elif isinstance(img, np.ndarray):
        pil = _from_array(img)
    elif isinstance(img, (str, os.PathLike, bytes, bytearray, memoryview)) or hasattr(img, "read"):
        pil = _open(img)
    else:
        raise VLMError(f"unsupported image type {type(img).__name__}: pass a PIL image, a numpy array, a path or bytes")

    original = pil.size
    _check_size(*original)
    try:
        if max(pil.size) > MAX_SIDE and pil.mode in _RESIZE_FIRST and "transparency" not in pil.info:
            pil = _fit(pil)  # shrink before converting: converting 64 MP first is slow
        pil = _to_rgb(pil)
        pil = _fit(pil)
    except VLMError:
        raise
    except Exception as e:  # PIL raises many types for odd modes/data
        raise VLMError(f"could not convert image (mode {pil.mode}) to RGB: {type(e).__name__}: {e}") from e
    return pil, original


def _check_size(w: int, h: int) -> None:
    if w <= 0 or h <= 0:
        raise VLMError(f"image is empty ({w}x{h})")
    if w * h > MAX_PIXELS:
        raise VLMError(f"image is too large: {w}x{h} = {w * h / 1e6:.0f} megapixels (limit {MAX_PIXELS // 1_000_000})")
    aspect = max(w, h) / min(w, h)
    if aspect > MAX_ASPECT:
        raise VLMError(f"image aspect ratio {aspect:.0f}:1 ({w}x{h}) is too extreme (limit {MAX_ASPECT:.0f}:1)")


def _open(src: Any) -> Image.Image:
    """Decode a path/bytes/file with PIL, checking the header size before decoding pixels."""
    name = "image bytes"
    if isinstance(src, (str, os.PathLike)):
        name = str(src)
        if not Path(src).is_file():
            raise VLMError(f"image file not found: {name}")
        fp: Any = name
    elif isinstance(src, (bytes, bytearray, memoryview)):
        if len(src) == 0:
            raise VLMError("image bytes are empty")
        fp = io.BytesIO(bytes(src))
    else:
        fp = src
    try:
        with warnings.catch_warnings():
            # we apply our own (lower) pixel limit below, before any pixel is decoded
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(fp)
            _check_size(*im.size)
            im.load()
            im = ImageOps.exif_transpose(im)
    except VLMError:
        raise
    except Image.DecompressionBombError as e:
        raise VLMError(f"image is too large to decode ({name}): {e}") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, MemoryError) as e:
        raise VLMError(f"could not read image ({name}): corrupt or unsupported file ({type(e).__name__})") from e
    except Exception as e:  # decoders raise odd types (struct.error, IndexError) on broken data
        raise VLMError(f"could not read image ({name}): corrupt file ({type(e).__name__})") from e
    return im


def _from_array(arr: np.ndarray) -> Image.Image:
    """Numpy -> PIL. Floats are taken as [0, 1] (or [0, 255] when the max exceeds ~1)."""
    if arr.dtype == object or arr.dtype.kind not in "biuf":
        raise VLMError(f"unsupported image array dtype {arr.dtype}")
    if arr.size == 0:
        raise VLMError(f"image array is empty (shape {tuple(arr.shape)})")
    a = arr
    if a.ndim == 3 and a.shape[-1] not in (1, 2, 3, 4) and a.shape[0] in (1, 3, 4):
        a = np.moveaxis(a, 0, -1)  # CHW -> HWC
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (2, 3, 4))):
        raise VLMError(f"image array must be HxW or HxWxC with C in 1..4, got shape {tuple(arr.shape)}")
    _check_size(a.shape[1], a.shape[0])

    if a.dtype.kind == "b":
        a8 = a.astype(np.uint8) * 255
    elif a.dtype == np.uint8:
        a8 = a
    elif a.dtype.kind == "f":
        af = a.astype(np.float32)
        if not np.isfinite(af).all():
            raise VLMError("image array contains NaN or infinite values")
        lo, hi = float(af.min()), float(af.max())
        if lo < 0:
            raise VLMError(f"float image array must be in [0, 1], got values down to {lo:.3g}")
        if hi <= 1.0 + 1e-3:
            af = af * 255.0
        elif hi > 255.0:
            raise VLMError(f"float image array must be in [0, 1], got values up to {hi:.3g}")
        a8 = np.clip(np.rint(af), 0, 255).astype(np.uint8)
    elif a.dtype == np.uint16:
        a8 = np.rint(a.astype(np.float32) / 257.0).astype(np.uint8)
    else:  # other integer types: accept only the 8-bit range, anything else is ambiguous
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi > 255:
            raise VLMError(f"integer image array of dtype {a.dtype} must be in [0, 255], got [{lo}, {hi}]")
        a8 = a.astype(np.uint8)

    # shape picks the mode: HxW -> L, HxWx2 -> LA, HxWx3 -> RGB, HxWx4 -> RGBA
    return Image.fromarray(np.ascontiguousarray(a8))


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB, compositing transparency on white (a black background would
    invent dark content that the model then 'sees')."""
    if im.mode in _HIGH_BIT_MODES:
        return _high_bit_to_rgb(im)
    has_alpha = im.mode in _ALPHA_MODES or "transparency" in im.info
    if has_alpha:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if im.mode == "RGB":
        return im.copy()
    return im.convert("RGB")  # 1, L, P, CMYK, YCbCr, LAB, HSV, RGBX ...


def _high_bit_to_rgb(im: Image.Image) -> Image.Image:
    """16/32-bit and float grayscale: PIL's own convert clips at 255 (a 16-bit scan turns white),
    so map the value range explicitly."""
    a = np.asarray(im).astype(np.float64)
    a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
    hi = float(a.max()) if a.size else 0.0
    lo = float(a.min()) if a.size else 0.0
    if im.mode.startswith("I;16"):
        a = a / 257.0
    elif im.mode == "F" and lo >= 0 and hi <= 1.0 + 1e-3:
        a = a * 255.0
    elif im.mode == "I" and hi > 255:
        a = a / 257.0 if (lo >= 0 and hi <= 65535) else (a - lo) / max(hi - lo, 1e-12) * 255.0
    a8 = np.clip(np.rint(a), 0, 255).astype(np.uint8)
    return Image.fromarray(np.stack([a8] * 3, axis=-1))


def _fit(im: Image.Image) -> Image.Image:
    """Cap the long side at MAX_SIDE, then raise the short side to MIN_SIDE (aspect kept)."""
    w, h = im.size
    if max(w, h) > MAX_SIDE:
        s = MAX_SIDE / max(w, h)
        w, h = max(1, round(w * s)), max(1, round(h * s))
        # reducing_gap=1: integer box-reduce first (fast, anti-aliased), then bicubic
        im = im.resize((w, h), Image.Resampling.BICUBIC, reducing_gap=1.0)
    if min(w, h) < MIN_SIDE:
        s = MIN_SIDE / min(w, h)
        w, h = max(MIN_SIDE, math.ceil(w * s - 1e-9)), max(MIN_SIDE, math.ceil(h * s - 1e-9))
        im = im.resize((w, h), Image.Resampling.BICUBIC)
    return im
