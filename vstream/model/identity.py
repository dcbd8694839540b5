"""Who a model is, portably: the name, sizes and weights an estimator or a label set is tied to."""

from __future__ import annotations

import hashlib
import re
import weakref
from pathlib import Path
from typing import Any

import torch

from vstream.model.vlm import VLM

_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_SAMPLE = 4096  # leading values hashed from each sampled tensor


def model_name(vlm: VLM) -> str:
    """A portable name for the loaded model: the hub id ("org/name") for hub ids and hub-cache
    snapshots, otherwise the model folder's name (e.g. "demo-model")."""
    raw = str(getattr(vlm.model, "name_or_path", "") or getattr(vlm.model.config, "_name_or_path", "") or "")
    m = re.search(r"models--([^/\\]+)--([^/\\]+)[/\\]snapshots", raw)
    if m:
        return f"{m.group(1)}/{m.group(2)}"
    p = Path(raw)
    if raw and p.exists():
        return p.resolve().name
    return raw.rstrip("/\\")


def weights_fingerprint(vlm: VLM) -> str:
    """16 hex digits that tell two sets of weights apart without reading all of them: a hash of
    every parameter's name and shape plus the leading values of the first, middle and last
    parameters and of the output head. Two fine-tunes of one architecture differ here; the same
    checkpoint loaded twice (any device, same dtype) does not. Cached per model object."""
    model = vlm.model
    if model in _FINGERPRINTS:
        return _FINGERPRINTS[model]
    params = list(model.named_parameters())
    h = hashlib.sha256()
    for name, p in params:
        h.update(f"{name}:{tuple(p.shape)};".encode())
    head = model.get_output_embeddings()
    picks = [params[0][1], params[len(params) // 2][1], params[-1][1]] + ([head.weight] if head is not None else [])
    with torch.no_grad():
        for p in picks:
            if p.device.type == "meta":
                continue
            h.update(p.detach().reshape(-1)[:_SAMPLE].float().cpu().numpy().tobytes())
    fp = h.hexdigest()[:16]
    _FINGERPRINTS[model] = fp
    return fp


def model_identity(vlm: VLM) -> dict[str, Any]:
    """What an estimator or a label set records of the model it was made for: its name,
    architecture and sizes, and a fingerprint of its weights."""
    tc = vlm.text_config
    return {
        "model": model_name(vlm),
        "model_type": str(vlm.arch),
        "num_layers": int(vlm.num_layers),
        "num_heads": int(vlm.num_heads),
        "hidden_size": int(getattr(tc, "hidden_size", 0) or 0),
        "vocab_size": int(getattr(tc, "vocab_size", 0) or 0),
        "weights": weights_fingerprint(vlm),
    }
