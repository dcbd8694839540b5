"""Resumable training state, the learning-rate schedule and final model folders, shared by the
demo and TaYS trainers.

A run folder holds `latest/`: the accelerate state (model, optimizer, RNG) plus `step.json`
(step, loss EMA, seconds spent and whatever else the trainer records). Rerunning the same
command resumes from it. The final model is saved as safetensors beside its tokenizer, image
processor and a training.json, so `load_vlm(folder)` works offline.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

__all__ = ["lr_at", "read_step", "resume", "save_final", "save_step"]


def lr_at(step: int, total: int, peak: float, warmup: int, time_frac: float = 0.0) -> float:
    """Linear warm-up over min(warmup, total // 10) steps, then cosine to 10% of the peak over
    whichever runs out first: the steps or the time budget (`time_frac`, the share of --minutes
    spent), so a run cut short on a slow or busy machine still ends annealed."""
    warmup = max(1, min(warmup, total // 10))
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = max((step - warmup) / max(1, total - warmup), time_frac)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def read_step(state: Path) -> dict[str, Any] | None:
    """The step record of a run's `latest/` folder, or None when there is none yet."""
    f = Path(state) / "step.json"
    return json.loads(f.read_text()) if f.exists() else None


def resume(acc: Accelerator, state: Path, match: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load the accelerate state when one was saved; returns its record ({} for a fresh run).
    `match`: record fields that must agree with this run (ValueError before loading if not)."""
    record = read_step(state)
    if record is None:
        return {}
    for key, want in (match or {}).items():
        if record.get(key, want) != want:
            raise ValueError(f"{state} holds a {key} {record[key]!r} run, not {want!r}")
    acc.load_state(str(state))
    acc.print(f"resuming from step {record['step']} in {state}")
    return record


def save_step(acc: Accelerator, state: Path, record: dict[str, Any]) -> None:
    """Save the accelerate state, then (main process) the step record beside it."""
    acc.save_state(str(state))
    if acc.is_main_process:
        (Path(state) / "step.json").write_text(json.dumps(record))


def save_final(
    model: Any,
    tokenizer: Any,
    image_processor: Any,
    out: Path,
    meta: dict[str, Any],
    dtype: torch.dtype = torch.float16,
) -> None:
    """The trained model as a loadable folder. float16 on disk keeps shipped weights small;
    loading upcasts to the chosen dtype."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.to(dtype).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    image_processor.save_pretrained(out)
    (out / "training.json").write_text(json.dumps(meta, indent=2))


def agreed_seconds(acc: Accelerator, seconds: float) -> float:
    """The largest elapsed time over all processes, so every process takes the same LR and
    stops at the same step (a process leaving the loop alone would hang the others)."""
    if acc.num_processes == 1:
        return seconds
    return acc.gather(torch.tensor([seconds], device=acc.device)).max().item()
