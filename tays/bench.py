"""Benchmarks of the three paradigms on shapes-world streams (``python -m tays bench | memory``).

`bench` replays one held-out stream in real time at each FPS for each paradigm (batch,
interleaved, tays) and returns ``{paradigm: {fps: metrics}, "decode_step_ms_p95_idle": ...,
"decode_step_ms_p95_ingesting": ..., "contention": {...}, "acceptance": {...}, "meta": {...}}``;
the contention figures come from `measure_decode_contention` (TaYS decode steps while ingestion is
idle vs busy).

`memory` runs a sped-up (as fast as ingestion goes) TaYS stream of `short` and of `long` seconds
with a visual window, each in a fresh Python process (`memory_run`, through ``python -m tays
memory-run``), and reports each process's peak resident set size (VmHWM from /proc/self/status:
model, torch, caches, frames, Python objects; everything) plus RSS sampled during the stream and
the video-cache size. Progress goes to stderr.

`trace_memory` is the real-scale figure: peak memory and decode speed of one TaYS run against the
length of its generated trace (one reasoning step of T tokens while the stream is ingested), on
the demo model or on a supported architecture with random weights (``--random-init NAME``, at its
published size or ``--reduced``; `vstream.model.random_init`). TaYS runs Qwen2.5-VL only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tays.engine import THREAD_PREFIX, StreamingEngine
from tays.forward import SUPPORTED_ARCHS
from tays.metrics import finite_json, overlap, percentile
from tays.paradigms import run_paradigm
from tays.protocol import PARADIGMS
from tays.sampling import next_token
from tays.sources import FrameChecker, ShapesSource
from tays.watch import StreamAttributor
from vstream.attr.estimator import load as load_estimator
from vstream.model import VLM, VLMError, load_vlm
from vstream.model.random_init import random_init_vlm, read_spec
from vstream.world.assets import DEMO_MODEL_DIR, ROOT
from vstream.world.shapes import HELDOUT_SEEDS
from vstream.world.shapes_video import Stream, make_stream

__all__ = [
    "DEFAULT_MODEL",
    "METRIC_KEYS",
    "attribution_acceptance",
    "bench",
    "measure_decode_contention",
    "memory",
    "memory_run",
    "trace_memory",
]

DEFAULT_MODEL = DEMO_MODEL_DIR
METRIC_KEYS = (
    "ttft_s",
    "ttft_question_s",
    "delay_s",
    "decode_tokens_per_s",
    "frames_per_s",
    "event_deviation_s",
    "steps_matched",
    "tokens",
    "answer_tokens",
    "reasoning_steps",
    "frames",
    "frame_groups",
    "ingest_lag_max_s",
    "stream_end_s",
    "decode_step_ms_p50",
    "decode_step_ms_p95",
)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _fmt(x: Any, nd: int = 3) -> str:
    return "-" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def load_model(model: str | None, random_init: str | None = None, reduced: bool = False) -> VLM:
    """The model folder `model`, the demo model (SystemExit if it is not there yet), or with
    `random_init` that architecture with random weights (on a GPU when there is one)."""
    if random_init:
        arch = read_spec(random_init)["model_type"]
        if arch not in SUPPORTED_ARCHS:  # refused before building billions of random weights
            raise VLMError(f"TaYS streaming supports {', '.join(SUPPORTED_ARCHS)} for now; {random_init} is {arch}")
        return random_init_vlm(random_init, reduced=reduced)
    path = Path(model) if model else DEFAULT_MODEL
    if model is None and not (path / "config.json").is_file():
        raise SystemExit(f"no model at {path} (the demo model is not there yet); pass --model PATH")
    return load_vlm(str(path), device="cpu")


def set_threads(n: int | None) -> None:
    """torch intra-op threads (0 / None: torch's default)."""
    if n:
        torch.set_num_threads(int(n))


def heldout_stream(seed_index: int, duration: float) -> Stream:
    return make_stream(HELDOUT_SEEDS[seed_index], duration=duration)


def bench(
    model: str | None = None,
    fps: Sequence[float] = (1, 2, 3, 4, 5),
    duration: float = 12.0,
    paradigms: Sequence[str] = PARADIGMS,
    seed: int = 0,
    question_at: float = 1.0,
    max_new_tokens: int = 128,
    step_tokens: int = 8,
    answer_tokens: int = 8,
    speed: float = 1.0,
    threads: int = 1,
    contention_steps: int = 128,
    random_init: str | None = None,
    reduced: bool = False,
    attribute: bool = False,
    estimator: str | None = None,
    repeat: int = 1,
) -> dict[str, Any]:
    """TTFT / delay / throughput of `paradigms` at each FPS (module docstring); fps, duration and
    speed of the replay, the rest as `run_paradigm` and `measure_decode_contention` take them.
    attribute: right after each plain TaYS run, the same replay with attribution while watching
    (`tays.watch`, with `estimator`) under "tays_attributed", and its promises in "acceptance".
    repeat: replays per paradigm and FPS, the order of the paradigms reversed every other time;
    each figure is then the median over the replays (`*_runs` keep every replay's decode speed
    and TTFT), since one short replay's TTFT and tokens/s vary by more than a decode step."""
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    set_threads(threads)
    t_start = time.perf_counter()
    vlm = load_model(model, random_init, reduced)
    stream = heldout_stream(seed, duration)
    kw = dict(max_new_tokens=max_new_tokens, step_tokens=step_tokens, answer_tokens=answer_tokens)
    _log(
        f"model {vlm!r}; stream seed {stream.seed}, {stream.duration:g} s, question {stream.question!r}; "
        f"torch threads {torch.get_num_threads()}"
    )

    _log("warm-up (not timed) ...")
    for p in paradigms:
        run_paradigm(vlm, ShapesSource(stream, fps=2.0, realtime=False), paradigm=p, **kw)
    _log("decode latency with the ingestion thread idle vs busy ...")
    cont = measure_decode_contention(
        vlm, [f for _, f in stream.frames(2.0)[:24]], question=stream.question, n_steps=contention_steps
    )
    _log("  " + ", ".join(f"{k} {_fmt(v)}" for k, v in cont.items()))

    est = None
    if attribute:
        est = load_estimator(estimator, vlm, allow_model_mismatch=True) if estimator else None
        run_paradigm(vlm, ShapesSource(stream, fps=2.0, realtime=False), observer=StreamAttributor(est), **kw)
    runs = [*paradigms, *(["tays_attributed"] if attribute and "tays" in paradigms else [])]
    replays: dict[str, dict[str, list[dict[str, Any]]]] = {p: {} for p in runs}
    for f, rep in [(f, rep) for f in fps for rep in range(repeat)]:
        for p in runs if rep % 2 == 0 else runs[::-1]:
            src = ShapesSource(stream, fps=f, realtime=True, speed=speed)
            obs = StreamAttributor(est) if p == "tays_attributed" else None
            r = run_paradigm(vlm, src, stream.question, p.split("_")[0], question_at=question_at, observer=obs, **kw)
            m = {k: r.metrics.get(k) for k in METRIC_KEYS}
            if obs is not None:
                m["score_latency_ms"] = [round((x.ready - x.end) * 1000, 2) for x in obs.steps]
            if p.startswith("tays"):
                idle = [c.seconds * 1000 for c in r.decode_calls if c.n_fed == 1 and not c.ingesting]
                busy = [c.seconds * 1000 for c in r.decode_calls if c.n_fed == 1 and c.ingesting]
                m["run_decode_step_ms_p95_idle"] = percentile(idle, 95)
                m["run_decode_step_ms_p95_ingesting"] = percentile(busy, 95)
                m["run_steps_ingesting"] = len(busy)
            if r.messages:
                m["messages"] = r.messages[:5]
            replays[p].setdefault(f"{f:g}", []).append(m)
            _log(
                f"{p:11s} fps {f:g}: ttft {_fmt(m['ttft_s'])} s (question {_fmt(m['ttft_question_s'])} s), "
                f"delay {_fmt(m['delay_s'])} s, decode {_fmt(m['decode_tokens_per_s'], 1)} tok/s, "
                f"ingest {_fmt(m['frames_per_s'], 1)} frames/s, lag {_fmt(m['ingest_lag_max_s'])} s, "
                f"deviation {_fmt(m['event_deviation_s'])} s, {m['tokens']} tokens"
            )
    results = {p: {f: median_of_replays(ms) for f, ms in by_fps.items()} for p, by_fps in replays.items()}

    out: dict[str, Any] = dict(results)
    out["decode_step_ms_p95_idle"] = cont.get("decode_step_ms_p95_idle")
    out["decode_step_ms_p95_ingesting"] = cont.get("decode_step_ms_p95_ingesting")
    out["contention"] = cont
    out["acceptance"] = _acceptance(results, cont)
    out["meta"] = {
        "model": _model_label(model, random_init, reduced),
        "stream_seed": stream.seed,
        "duration_s": stream.duration,
        "question": stream.question,
        "question_at_s": question_at,
        "speed": speed,
        "max_new_tokens": max_new_tokens,
        "step_tokens": step_tokens,
        "answer_tokens": answer_tokens,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "wall_s": time.perf_counter() - t_start,
        "times": "wall clock (time.perf_counter), seconds since stream start",
    }
    _log(f"acceptance: {json.dumps(finite_json(out['acceptance']))}")
    return out


def median_of_replays(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One replay's metrics as they are; several: each number the median over the replays, with
    every replay's decode speed and TTFT after the question kept beside it."""
    if len(runs) == 1:
        return runs[0]
    out = dict(runs[-1])
    for k, v in runs[-1].items():
        vals = [r.get(k) for r in runs]
        if isinstance(v, (int, float)) and not isinstance(v, bool) and all(isinstance(x, (int, float)) for x in vals):
            out[k] = float(np.median(vals))
    if "score_latency_ms" in out:
        out["score_latency_ms"] = [x for r in runs for x in r.get("score_latency_ms", [])]
    for k in ("decode_tokens_per_s", "ttft_question_s"):
        out[f"{k}_runs"] = [r.get(k) for r in runs]
    out["replays"] = len(runs)
    return out


def _acceptance(results: dict[str, dict[str, Any]], cont: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets: TaYS delay flat across FPS (within 10%), TaYS TTFT after the question
    within one decode step + 20 ms, decode p95 while ingesting within 1.5x of idle."""
    acc: dict[str, Any] = {}
    if "tays" in results and results["tays"]:
        delays = [v["delay_s"] for v in results["tays"].values() if v["delay_s"] is not None]
        if delays:
            spread = (max(delays) - min(delays)) / min(delays)
            acc["tays_delay_spread"] = spread
            acc["tays_delay_within_10pct"] = spread <= 0.10
        ttq = [v["ttft_question_s"] for v in results["tays"].values() if v["ttft_question_s"] is not None]
        step = cont.get("decode_step_ms_p50_idle")
        if ttq and step is not None:
            acc["tays_ttft_question_max_s"] = max(ttq)
            acc["tays_ttft_budget_s"] = step / 1000 + 0.020
            acc["tays_ttft_within_step_plus_20ms"] = max(ttq) <= step / 1000 + 0.020
    if results.get("tays_attributed") and results.get("tays"):
        acc.update(attribution_acceptance(results["tays"], results["tays_attributed"], cont))
    p_idle, p_busy = cont.get("decode_step_ms_p95_idle"), cont.get("decode_step_ms_p95_ingesting")
    if p_idle and p_busy:
        acc["p95_ingesting_over_idle"] = p_busy / p_idle
        acc["p95_ingesting_within_1_5x"] = p_busy <= 1.5 * p_idle
    return acc


def attribution_acceptance(
    plain: dict[str, dict[str, Any]], attr: dict[str, dict[str, Any]], cont: dict[str, Any]
) -> dict[str, Any]:
    """Attribution keeps TaYS's promises: delay flat over FPS (within 10%), decode tokens/s at
    least 0.9x the plain run's (median over FPS, each FPS run back to back), TTFT after the
    question within one decode step of the plain run's."""
    acc: dict[str, Any] = {}
    delays = [v["delay_s"] for v in attr.values() if v["delay_s"] is not None]
    if delays:
        acc["attributed_delay_spread"] = (max(delays) - min(delays)) / min(delays)
        acc["attributed_delay_within_10pct"] = acc["attributed_delay_spread"] <= 0.10
    ratios = [
        attr[f]["decode_tokens_per_s"] / plain[f]["decode_tokens_per_s"]
        for f in attr
        if f in plain and attr[f]["decode_tokens_per_s"] and plain[f]["decode_tokens_per_s"]
    ]
    if ratios:
        acc["attributed_decode_ratio_per_fps"] = ratios
        acc["attributed_decode_ratio_median"] = float(sorted(ratios)[len(ratios) // 2])
        acc["attributed_decode_at_least_0_9x"] = acc["attributed_decode_ratio_median"] >= 0.9
    step = cont.get("decode_step_ms_p50_idle")
    diffs = [
        attr[f]["ttft_question_s"] - plain[f]["ttft_question_s"]
        for f in attr
        if f in plain and attr[f]["ttft_question_s"] is not None and plain[f]["ttft_question_s"] is not None
    ]
    if diffs and step is not None:
        acc["attributed_ttft_question_minus_plain_max_s"] = max(diffs)
        acc["attributed_ttft_within_one_step"] = max(diffs) <= step / 1000
    return acc


# ----------------------------------------------------------------------------------------------
# decode latency with and without concurrent ingestion (TaYS)


def measure_decode_contention(
    vlm: VLM,
    frames: Sequence[Any],
    question: str = "What happens in the video?",
    n_steps: int = 96,
    block: int = 16,
    visual_window: int = 8,
    fps: float = 2.0,
    ingest: str = "auto",
) -> dict[str, Any]:
    """p50/p95 latency of single-token TaYS decode steps while the ingestion thread is idle vs
    busy. Alternating blocks of `block` steps: idle (nothing queued) and ingesting (a
    ``tays-stress`` thread keeps 1-2 frame groups queued, so ingestion never pauses). Each step
    is classified afterwards from the engine's own ingestion timings: "ingesting" if at least
    half of it overlapped the ingestion of a group, "idle" if none of it did (others are left
    out). The visual window is full before the first block, so every step attends to as many
    frame tokens. ingest: the engine's ingestion mode ("auto": a worker process on CPU)."""
    checker = FrameChecker()
    frames = [checker(f) for f in frames]
    if len(frames) < 2:
        raise ValueError("measure_decode_contention needs at least 2 frames")
    tp = vlm.temporal_patch_size
    eng = StreamingEngine(vlm, visual_window=visual_window, fps=fps, ingest=ingest)
    calls: list[tuple[str, float, float]] = []
    feeding, quit_ = threading.Event(), threading.Event()
    state = {"pushed": 0, "i": 0}

    def push_group() -> None:
        for _ in range(tp):
            eng.push_frame(frames[state["i"] % len(frames)])
            state["i"] += 1
        state["pushed"] += 1

    def feeder() -> None:
        while not quit_.is_set():
            if not feeding.wait(0.05):
                continue
            if state["pushed"] - eng.frames_ingested < 2:
                push_group()
            else:
                eng.wait_frames(state["pushed"] - 1, timeout=0.05)

    th = threading.Thread(target=feeder, name=THREAD_PREFIX + "stress", daemon=True)
    try:
        eng.start(question)
        t_eng = eng.start_time
        for _ in range(visual_window + 1):
            push_group()
        eng.wait_idle()
        tok = next_token(eng.decode_step(eng.header_ids)[-1])
        for _ in range(4):  # warm-up
            tok = next_token(eng.decode_step(tok)[-1])
        th.start()
        for _ in range(max(1, n_steps // (2 * block))):
            for mode in ("idle", "ingesting"):
                if mode == "idle":
                    feeding.clear()
                    time.sleep(0.005)
                    eng.wait_idle()
                else:
                    feeding.set()
                    eng.wait_frames(eng.frames_ingested + 1, timeout=5.0)  # ingestion is running
                for _ in range(block):
                    a = time.perf_counter()
                    tok = next_token(eng.decode_step(tok)[-1])
                    calls.append((mode, a - t_eng, time.perf_counter() - t_eng))
        feeding.clear()
    finally:
        quit_.set()
        if th.is_alive():
            th.join()
        eng.stop()
    spans = sorted((r.committed_at - r.ingest_s, r.committed_at) for r in eng.frame_log)
    idle, busy, partial = [], [], 0
    for _, a, b in calls:
        ov = overlap(a, b, spans)
        if ov <= 0:
            idle.append((b - a) * 1000)
        elif ov >= 0.5 * (b - a):
            busy.append((b - a) * 1000)
        else:
            partial += 1
    ing = [r for r in eng.frame_log if r.index > visual_window]
    return {
        "decode_step_ms_p50_idle": percentile(idle, 50),
        "decode_step_ms_p95_idle": percentile(idle, 95),
        "decode_step_ms_p50_ingesting": percentile(busy, 50),
        "decode_step_ms_p95_ingesting": percentile(busy, 95),
        "steps_idle": len(idle),
        "steps_ingesting": len(busy),
        "steps_partial": partial,
        "ingest_ms_p50": percentile([r.ingest_s * 1000 for r in ing], 50),
        "frames_per_s_while_decoding": (tp * len(ing) / sum(r.ingest_s for r in ing)) if ing else None,
        "ingest": eng.ingest,
    }


# ----------------------------------------------------------------------------------------------
# memory


def _proc_status(key: str) -> float:
    """A /proc/self/status field in MiB (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def memory_run(
    duration: float,
    fps: float = 2.0,
    window: int = 8,
    model: str | None = None,
    seed: int = 0,
    max_new_tokens: int = 64,
    threads: int = 1,
) -> dict[str, Any]:
    """One sped-up TaYS stream of `duration` seconds in this process: its memory figures."""
    set_threads(threads)
    rss0 = _proc_status("VmRSS")
    vlm = load_model(model)
    stream = heldout_stream(seed, duration)
    rss_loaded = _proc_status("VmRSS")
    samples: list[tuple[float, float]] = []  # (seconds since the stream began, RSS MiB)
    done = threading.Event()
    t0 = time.perf_counter()

    def sample() -> None:
        while not done.wait(0.1):
            samples.append((time.perf_counter() - t0, _proc_status("VmRSS")))

    th = threading.Thread(target=sample, name="tays-rss", daemon=True)
    th.start()
    try:
        res = run_paradigm(
            vlm,
            ShapesSource(stream, fps=fps, realtime=False),
            stream.question,
            "tays",
            max_new_tokens=max_new_tokens,
            visual_window=window,
        )
    finally:
        done.set()
        th.join()
    wall = time.perf_counter() - t0
    samples.append((wall, _proc_status("VmRSS")))

    def at(frac: float) -> float:
        return min(samples, key=lambda s: abs(s[0] - frac * wall))[1]

    tc = vlm.text_config
    per_token = tc.num_hidden_layers * 2 * tc.num_key_value_heads * (tc.hidden_size // tc.num_attention_heads)
    per_token *= vlm.dtype.itemsize
    return {
        "duration_s": duration,
        "fps": fps,
        "visual_window": window,
        "frames": res.metrics.get("frames"),
        "frame_groups": res.metrics.get("frame_groups"),
        "tokens": res.metrics.get("tokens"),
        "wall_s": wall,
        "stream_s_per_wall_s": duration / wall,
        "rss_before_load_mb": rss0,
        "rss_after_load_mb": rss_loaded,
        "rss_at_10_25_50_75_100pct_mb": [at(f) for f in (0.1, 0.25, 0.5, 0.75, 1.0)],
        "rss_max_during_stream_mb": max(s[1] for s in samples),
        "peak_rss_mb": _proc_status("VmHWM"),
        "video_capacity_max_tokens": res.video_capacity_max,
        "video_cache_max_mb": res.video_capacity_max * per_token / 2**20,
        "messages": res.messages[:5],
    }


def memory(
    long: float = 3600.0,
    short: float = 300.0,
    fps: float = 2.0,
    window: int = 8,
    model: str | None = None,
    max_new_tokens: int = 64,
    threads: int = 1,
) -> dict[str, Any]:
    """Peak memory of a `long` vs a `short` stream, each measured by `memory_run` in a fresh process."""
    runs: dict[str, Any] = {}
    for label, dur in (("short", short), ("long", long)):
        cmd = [
            sys.executable,
            "-m",
            "tays",
            "memory-run",
            "--duration",
            str(dur),
            "--fps",
            str(fps),
            "--window",
            str(window),
            "--max-new-tokens",
            str(max_new_tokens),
        ]
        if model:
            cmd += ["--model", model]
        if threads:
            cmd += ["--threads", str(threads)]
        _log(f"{label}: {dur:g} s stream at {fps:g} FPS, window {window} ...")
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT))
        lines = [ln for ln in p.stdout.splitlines() if ln.strip()]
        if p.returncode != 0 or not lines:
            _log(p.stderr[-2000:])
            raise SystemExit(f"memory-run for {dur:g} s failed (exit {p.returncode})")
        runs[label] = json.loads(lines[-1])
        r = runs[label]
        _log(
            f"  {r['frames']} frames in {r['wall_s']:.1f} s; peak RSS {r['peak_rss_mb']:.1f} MiB, "
            f"max during stream {r['rss_max_during_stream_mb']:.1f} MiB, "
            f"video cache <= {r['video_cache_max_mb']:.2f} MiB"
        )
    s, l = runs["short"], runs["long"]
    out = {
        "measure": "peak RSS (VmHWM of /proc/self/status) of a fresh process per stream, model load included; "
        "also RSS sampled every 0.1 s during the stream",
        "short": s,
        "long": l,
        "peak_rss_ratio": l["peak_rss_mb"] / s["peak_rss_mb"],
        "peak_within_10pct": l["peak_rss_mb"] <= 1.10 * s["peak_rss_mb"],
        "stream_rss_ratio": l["rss_max_during_stream_mb"] / s["rss_max_during_stream_mb"],
        "stream_growth_mb": {k: r["rss_max_during_stream_mb"] - r["rss_after_load_mb"] for k, r in runs.items()},
    }
    _log(f"peak ratio long/short {out['peak_rss_ratio']:.3f} (within 10%: {out['peak_within_10pct']})")
    return out


def _model_label(model: str | None, random_init: str | None, reduced: bool) -> str:
    if random_init:
        return f"random-init {random_init}" + (" (reduced)" if reduced else "")
    return str(model or DEFAULT_MODEL)


class _Peak:
    """Peak memory above the level at entry: CUDA allocator on a GPU, sampled RSS on a CPU."""

    def __init__(self, device: torch.device):
        self.device, self.mb, self._stop = device, 0.0, threading.Event()

    def __enter__(self) -> _Peak:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device) / 2**20
        else:
            self._base = self._peak = _proc_status("VmRSS")
            self._th = threading.Thread(target=self._sample, name="tays-peak", daemon=True)
            self._th.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self._peak = max(self._peak, _proc_status("VmRSS"))

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self._stop.set()
            self._th.join()
            peak = max(self._peak, _proc_status("VmRSS"))
        self.mb = round(peak - self._base, 1)


def trace_memory(
    lengths: Sequence[int] = (512, 1024, 2048, 4096, 8192),
    model: str | None = None,
    random_init: str | None = None,
    reduced: bool = False,
    duration: float = 12.0,
    fps: float = 2.0,
    seed: int = 0,
) -> dict[str, Any]:
    """Peak memory and decode speed of a TaYS run against its generated-trace length T: one
    reasoning step of T tokens (no early step end) while a sped-up held-out stream is ingested."""
    vlm = load_model(model, random_init, reduced)
    stream = heldout_stream(seed, duration)
    run = lambda t: run_paradigm(  # noqa: E731
        vlm,
        ShapesSource(stream, fps=fps, realtime=False),
        stream.question,
        "tays",
        max_new_tokens=int(t),
        step_tokens=int(t),
        answer_tokens=1,
        period_ends_step=False,
    )
    run(min(8, min(lengths)))  # warm-up
    rows = []
    for t in lengths:
        _log(f"trace length {t} ...")
        with _Peak(vlm.device) as peak:
            r = run(t)
        rows.append(
            {
                "trace_tokens": int(t),
                "tokens": r.metrics.get("tokens"),
                "decode_tokens_per_s": r.metrics.get("decode_tokens_per_s"),
                "frames": r.metrics.get("frames"),
                "video_cache_tokens_max": r.video_capacity_max,
                "peak_mb": peak.mb,
            }
        )
    return {
        "rows": rows,
        "model": _model_label(model, random_init, reduced),
        "parameters": sum(p.numel() for p in vlm.model.parameters()),
        "device": str(vlm.device),
        "dtype": str(vlm.dtype).replace("torch.", ""),
        "stream_s": duration,
        "fps": fps,
        "measure": "peak above the level before each run: CUDA max_memory_allocated on a GPU, "
        "RSS sampled every 5 ms on a CPU",
    }
