"""Who a model is, portably: the name and sizes an estimator or a label set is tied to."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from vstream.model.vlm import VLM


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


def model_identity(vlm: VLM) -> dict[str, Any]:
    """What an estimator or a label set records of the model it was made for."""
    return {
        "model": model_name(vlm),
        "model_type": str(vlm.arch),
        "num_layers": int(vlm.num_layers),
        "num_heads": int(vlm.num_heads),
    }
