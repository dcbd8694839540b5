"""How a model expects to reason over a stream: the options `run_paradigm` needs for it.

A checkpoint trained by `tays.train` closes every reasoning step with ``<|eot|>``, opens the
answer with ``</think>`` and says so in its training.json ("format"); it must be run with the
same protocol it was trained and evaluated with (`tays.evaluate`). Any other model (the image
demo model, a Hugging Face VLM) keeps `run_paradigm`'s defaults: a sentence end closes a step.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vstream.model import THINK_CLOSE, THINK_OPEN

__all__ = ["TRAINED", "run_options"]


# the SFT protocol of `tays.train` (its assistant and answer prefixes), and the
# step and answer lengths `python -m tays evaluate` runs it with
TRAINED: dict[str, Any] = {
    "assistant_prefix": THINK_OPEN, "answer_prefix": THINK_CLOSE, "period_ends_step": False,
    "step_tokens": 24, "answer_tokens": 6,
}


def run_options(vlm: Any) -> dict[str, Any]:
    """`run_paradigm` keyword options for `vlm`: TRAINED when the folder it was loaded from has
    a training.json with a "format" section (a `tays.train` checkpoint), else {} (defaults)."""
    path = getattr(vlm, "path", None)
    meta_file = Path(path) / "training.json" if path else None
    if meta_file is None or not meta_file.is_file():
        return {}
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError):
        return {}
    return dict(TRAINED) if isinstance(meta, dict) and isinstance(meta.get("format"), dict) else {}
