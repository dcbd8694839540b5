"""Attribution at real scale: speed and peak memory against the length of the generated trace.

    python -m vstream bench --random-init qwen2.5-vl-7b --json            # full size (a GPU)
    python -m vstream bench --random-init glm-4.1v-9b --reduced --lengths 64 128 --json   # a CPU

The demo model says nothing about a real 8 B model, so this runs a supported architecture at
its published size with random weights (`vstream.model.random_init`; the output head's rows for
end-of-turn tokens are zeroed so every trace runs to the requested length). Per trace length T
(default 512, 1k, 2k, 4k, 8k generated tokens), on one noise image of `image_side` pixels:

* plain: `vlm.stream` of T tokens, no capture: decode tokens/s and peak memory;
* vstream: `attribute_stream` of the same T tokens, a span closing every `span_tokens` tokens
  (random weights write no sentences): decode tokens/s (overhead ratio = live / plain), span
  latency p50/p95, per-span compute replayed alone, peak memory;
* occlusion: leave-one-region-out with the ablation operator on that trace, one mask per
  forward (the least memory it can take): seconds per span, peak memory;
* input_x_gradient: one forward and backward over prompt + trace: seconds per span and peak
  memory, or "out of memory" where it does not fit (the paper reports that near 2,350 tokens
  on its GPU).

Peak memory is `vstream.attr.memory.PeakMemory`: `torch.cuda.max_memory_allocated` above what
was allocated before (GPU), or the process's peak resident memory above its level before,
sampled every 2 ms (CPU; coarser). The timing does not depend on the weights, so a seeded
random linear estimator scores the spans.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import numpy as np
import torch
from PIL import Image

from vstream.attr.ablation import PlaceholderInTrace, ablation_effects
from vstream.attr.bench import RandomLinearEstimator, replay_seconds, run_live, run_plain
from vstream.attr.memory import PeakMemory
from vstream.attr.methods import AttributionContext, attribute_timed
from vstream.attr.spans import FixedSpans
from vstream.model import VLM

__all__ = ["DEFAULT_LENGTHS", "FixedSpans", "PeakMemory", "bench_scale"]

DEFAULT_LENGTHS = (512, 1024, 2048, 4096, 8192)


def _noise(side: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8))


def _oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def _one_length(vlm: VLM, est: Any, t: int, image: Image.Image, span_tokens: int, k: int | None) -> dict[str, Any]:
    question = "Describe the image step by step."
    inputs = vlm.build_inputs(question, image=image)
    row: dict[str, Any] = {
        "trace_tokens": t,
        "prompt_tokens": inputs.prompt_len,
        "image_tokens": int(inputs.image_token_positions.numel()),
    }
    with PeakMemory(vlm.device) as m:
        ids, times, _ = run_plain(vlm, inputs, t)
    row["plain"] = {"tokens": len(ids), "tokens_per_s": _rate(times), "peak_mb": m.mb}

    with PeakMemory(vlm.device) as m:
        live = run_live(vlm, image, question, est, k, t, splitter=FixedSpans(span_tokens))
    spans = live["spans"]
    lat = [s.latency_ms for s in spans]
    replay, _ = replay_seconds(vlm, live["session"], spans)
    vs_s = replay / len(spans) if spans else None
    row["vstream"] = {
        "tokens": live["done"].n_tokens,
        "tokens_per_s": _rate(live["times"]),
        "spans": len(spans),
        "span_latency_ms_p50": round(float(np.percentile(lat, 50)), 3) if lat else None,
        "span_latency_ms_p95": round(float(np.percentile(lat, 95)), 3) if lat else None,
        "s_per_span": _r(vs_s, 6),
        "peak_mb": m.mb,
    }
    p, lv = row["plain"]["tokens_per_s"], row["vstream"]["tokens_per_s"]
    row["overhead_ratio"] = _r(lv / p) if p and lv else None

    session = live["session"]
    gen = torch.tensor(live["done"].token_ids, dtype=torch.long)
    span_objs = [s.span for s in spans]
    assign = session.regions.assignment
    kk = session.regions.k
    row["k"] = kk
    try:
        with PeakMemory(vlm.device) as m:
            t0 = time.perf_counter()
            ablation_effects(vlm, session.inputs, gen, span_objs, torch.eye(kk, dtype=torch.bool), assign, batch_size=1)
            if vlm.device.type == "cuda":
                torch.cuda.synchronize(vlm.device)
            occ = (time.perf_counter() - t0) / max(1, len(spans))
        row["occlusion"] = {"s_per_span": _r(occ, 6), "peak_mb": m.mb}
        row["speedup_vs_occlusion"] = _r(occ / vs_s, 1) if vs_s else None
    except PlaceholderInTrace:  # a random trace may write an image placeholder: not teacher-forceable
        row["occlusion"] = "trace not teacher-forceable"
    except RuntimeError as e:
        if not _oom(e):
            raise
        row["occlusion"] = "out of memory"
        _free(vlm)

    ctx = AttributionContext(vlm, session.inputs, gen, span_objs, assign)
    if row["occlusion"] == "trace not teacher-forceable":
        row["input_x_gradient"] = row["occlusion"]
        return row
    try:
        with PeakMemory(vlm.device) as m:
            _, dt = attribute_timed("input_x_gradient", ctx)
        row["input_x_gradient"] = {"s_per_span": _r(dt / max(1, len(spans)), 6), "peak_mb": m.mb}
    except RuntimeError as e:
        if not _oom(e):
            raise
        row["input_x_gradient"] = "out of memory"
        _free(vlm)
    return row


def _free(vlm: VLM) -> None:
    if vlm.device.type == "cuda":
        torch.cuda.empty_cache()


def _rate(times: list[float]) -> float | None:
    return round((len(times) - 1) / (times[-1] - times[0]), 2) if len(times) >= 2 and times[-1] > times[0] else None


def _r(x: float | None, d: int = 4) -> float | None:
    return None if x is None or not np.isfinite(x) else round(float(x), d)


def bench_scale(
    vlm: VLM,
    lengths: tuple[int, ...] = DEFAULT_LENGTHS,
    image_side: int = 448,
    span_tokens: int = 32,
    k: int | None = None,
    estimator: Any = None,
    progress: bool = True,
) -> dict[str, Any]:
    """One row per trace length (see the module doc), plus what ran where."""
    if not lengths or min(lengths) < 2:
        raise ValueError("trace lengths must be >= 2 tokens")
    est = estimator if estimator is not None else RandomLinearEstimator(vlm.num_layers * vlm.num_heads)
    image = _noise(int(image_side))
    # warm-up: first calls pay for lazy initialisation, not for the length
    _one_length(vlm, est, min(8, min(lengths)), image, span_tokens, k)
    rows = []
    for t in lengths:
        if progress:
            print(f"bench: trace length {t}", file=sys.stderr)
        rows.append(_one_length(vlm, est, int(t), image, span_tokens, k))
    oom = [r["trace_tokens"] for r in rows if r["input_x_gradient"] == "out of memory"]
    n_params = sum(p.numel() for p in vlm.model.parameters())
    return {
        "rows": rows,
        "input_x_gradient_out_of_memory_from": min(oom) if oom else None,
        "parameters": n_params,
        "layers": vlm.num_layers,
        "heads": vlm.num_heads,
        "model_type": vlm.arch,
        "device": str(vlm.device),
        "device_name": torch.cuda.get_device_name(vlm.device) if vlm.device.type == "cuda" else "cpu",
        "dtype": str(vlm.dtype).replace("torch.", ""),
        "torch_threads": torch.get_num_threads(),
        "image_side": int(image_side),
        "span_tokens": int(span_tokens),
        "estimator": "random linear stand-in (timing does not depend on the weights)",
    }
