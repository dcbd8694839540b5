"""Command line: python -m tays <command> [options].

    python -m tays bench --json [--fps 1 2 3 4 5] [--duration 12] [--model PATH]
    python -m tays memory --json [--long 3600] [--short 300] [--window 8]
    python -m tays data [--annotations FILE.json | --shapes N] [--out trajectories.jsonl]
    python -m tays train --paradigm {tays,batch,interleaved} --steps N --minutes M --out DIR
    python -m tays evaluate --json [--n 200] [--tays DIR] [--batch DIR] [--interleaved DIR] [--speed S]

`bench` replays one held-out shapes-world stream in real time at each FPS for each paradigm
(batch, interleaved, tays) and, with --json, prints as its LAST line a JSON object
``{paradigm: {fps: metrics}, "decode_step_ms_p95_idle": ..., "decode_step_ms_p95_ingesting": ...,
"contention": {...}, "acceptance": {...}, "meta": {...}}``. Progress goes to stderr.

`memory` runs a sped-up (as fast as ingestion goes) TaYS stream of `--short` and of `--long`
seconds at `--fps` with a visual window, each in a fresh Python process, and reports each
process's peak resident set size (VmHWM from /proc/self/status: model, torch, caches, frames,
Python objects; everything) plus RSS sampled during the stream and the video-cache size.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from tays.metrics import finite_json
from vstream.world.assets import DEMO_MODEL_DIR, ROOT

DEFAULT_MODEL = DEMO_MODEL_DIR
METRIC_KEYS = ("ttft_s", "ttft_question_s", "delay_s", "decode_tokens_per_s", "frames_per_s",
               "event_deviation_s", "steps_matched", "tokens", "answer_tokens", "reasoning_steps", "frames",
               "frame_groups", "ingest_lag_max_s", "stream_end_s", "decode_step_ms_p50", "decode_step_ms_p95")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _load(model: str | None):
    from vstream.model import load_vlm

    path = Path(model) if model else DEFAULT_MODEL
    if model is None and not (path / "config.json").is_file():
        raise SystemExit(f"no model at {path} (the demo model is not there yet); pass --model PATH")
    return load_vlm(str(path), device="cpu")


def _threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(int(n))


def _fmt(x: Any, nd: int = 3) -> str:
    return "-" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def _stream(seed_index: int, duration: float):
    from vstream.world.shapes import HELDOUT_SEEDS
    from vstream.world.shapes_video import make_stream

    return make_stream(HELDOUT_SEEDS[seed_index], duration=duration)


# ----------------------------------------------------------------------------------------------
# bench


def bench(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m tays bench", description="TTFT / delay / throughput of the "
                                 "three paradigms on one shapes-world stream replayed in real time")
    ap.add_argument("--json", action="store_true", help="print the results as one JSON object on the last line")
    ap.add_argument("--fps", type=float, nargs="+", default=[1, 2, 3, 4, 5])
    ap.add_argument("--duration", type=float, default=12.0, help="stream length in seconds (>= 5)")
    ap.add_argument("--model", default=None, help=f"model folder (default {DEFAULT_MODEL})")
    ap.add_argument("--paradigms", nargs="+", default=["batch", "interleaved", "tays"],
                    choices=["batch", "interleaved", "tays"])
    ap.add_argument("--seed", type=int, default=0, help="index into the held-out stream seeds")
    ap.add_argument("--question-at", type=float, default=1.0, help="seconds after stream start the question arrives")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--step-tokens", type=int, default=8)
    ap.add_argument("--answer-tokens", type=int, default=8)
    ap.add_argument("--speed", type=float, default=1.0, help="replay speed (1 = real time)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: the decoding and the ingestion thread get a core each; 0: torch default)")
    ap.add_argument("--contention-steps", type=int, default=128)
    args = ap.parse_args(argv)

    import torch

    from tays.metrics import percentile
    from tays.paradigms import measure_decode_contention, run_paradigm
    from tays.sources import ShapesSource

    _threads(args.threads)
    t_start = time.perf_counter()
    vlm = _load(args.model)
    stream = _stream(args.seed, args.duration)
    kw = dict(max_new_tokens=args.max_new_tokens, step_tokens=args.step_tokens, answer_tokens=args.answer_tokens)
    _log(f"model {vlm!r}; stream seed {stream.seed}, {stream.duration:g} s, question {stream.question!r}; "
         f"torch threads {torch.get_num_threads()}")

    _log("warm-up (not timed) ...")
    for p in args.paradigms:
        run_paradigm(vlm, ShapesSource(stream, fps=2.0, realtime=False), paradigm=p, **kw)
    _log("decode latency with the ingestion thread idle vs busy ...")
    cont = measure_decode_contention(vlm, [f for _, f in stream.frames(2.0)[:24]], question=stream.question,
                                     n_steps=args.contention_steps)
    _log("  " + ", ".join(f"{k} {_fmt(v)}" for k, v in cont.items()))

    results: dict[str, dict[str, Any]] = {p: {} for p in args.paradigms}
    for fps in args.fps:
        for p in args.paradigms:
            src = ShapesSource(stream, fps=fps, realtime=True, speed=args.speed)
            r = run_paradigm(vlm, src, stream.question, p, question_at=args.question_at, **kw)
            m = {k: r.metrics.get(k) for k in METRIC_KEYS}
            if p == "tays":
                idle = [c.seconds * 1000 for c in r.decode_calls if c.n_fed == 1 and not c.ingesting]
                busy = [c.seconds * 1000 for c in r.decode_calls if c.n_fed == 1 and c.ingesting]
                m["run_decode_step_ms_p95_idle"] = percentile(idle, 95)
                m["run_decode_step_ms_p95_ingesting"] = percentile(busy, 95)
                m["run_steps_ingesting"] = len(busy)
            if r.messages:
                m["messages"] = r.messages[:5]
            results[p][f"{fps:g}"] = m
            _log(f"{p:11s} fps {fps:g}: ttft {_fmt(m['ttft_s'])} s (question {_fmt(m['ttft_question_s'])} s), "
                 f"delay {_fmt(m['delay_s'])} s, decode {_fmt(m['decode_tokens_per_s'], 1)} tok/s, "
                 f"ingest {_fmt(m['frames_per_s'], 1)} frames/s, lag {_fmt(m['ingest_lag_max_s'])} s, "
                 f"deviation {_fmt(m['event_deviation_s'])} s, {m['tokens']} tokens")

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
    p_idle, p_busy = cont.get("decode_step_ms_p95_idle"), cont.get("decode_step_ms_p95_ingesting")
    if p_idle and p_busy:
        acc["p95_ingesting_over_idle"] = p_busy / p_idle
        acc["p95_ingesting_within_1_5x"] = p_busy <= 1.5 * p_idle

    out: dict[str, Any] = dict(results)
    out["decode_step_ms_p95_idle"] = p_idle
    out["decode_step_ms_p95_ingesting"] = p_busy
    out["contention"] = cont
    out["acceptance"] = acc
    out["meta"] = {
        "model": str(args.model or DEFAULT_MODEL), "stream_seed": stream.seed, "duration_s": stream.duration,
        "question": stream.question, "question_at_s": args.question_at, "speed": args.speed,
        "max_new_tokens": args.max_new_tokens, "step_tokens": args.step_tokens,
        "answer_tokens": args.answer_tokens, "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "wall_s": time.perf_counter() - t_start,
        "times": "wall clock (time.perf_counter), seconds since stream start",
    }
    _log(f"acceptance: {json.dumps(finite_json(acc))}")
    if args.json:
        print(json.dumps(finite_json(out)), flush=True)
    else:
        print(json.dumps(finite_json(out), indent=1))
    return 0




# ----------------------------------------------------------------------------------------------
# memory


def _proc_status(key: str) -> float:
    """A /proc/self/status field in MiB (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def memory_run(argv: list[str]) -> int:
    """One stream in this process; prints one JSON line (used by `memory`)."""
    ap = argparse.ArgumentParser(prog="python -m tays memory-run")
    ap.add_argument("--duration", type=float, required=True)
    ap.add_argument("--fps", type=float, default=2.0)
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--model", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    from tays.paradigms import run_paradigm
    from tays.sources import ShapesSource

    _threads(args.threads)
    rss0 = _proc_status("VmRSS")
    vlm = _load(args.model)
    stream = _stream(args.seed, args.duration)
    rss_loaded = _proc_status("VmRSS")
    samples: list[tuple[float, float]] = []
    done = threading.Event()
    t0 = time.perf_counter()

    def sample() -> None:
        while not done.wait(0.1):
            samples.append((time.perf_counter() - t0, _proc_status("VmRSS")))

    th = threading.Thread(target=sample, name="tays-rss", daemon=True)
    th.start()
    try:
        res = run_paradigm(vlm, ShapesSource(stream, fps=args.fps, realtime=False), stream.question, "tays",
                           max_new_tokens=args.max_new_tokens, visual_window=args.window)
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
    out = {
        "duration_s": args.duration, "fps": args.fps, "visual_window": args.window,
        "frames": res.metrics.get("frames"), "frame_groups": res.metrics.get("frame_groups"),
        "tokens": res.metrics.get("tokens"), "wall_s": wall,
        "stream_s_per_wall_s": args.duration / wall,
        "rss_before_load_mb": rss0, "rss_after_load_mb": rss_loaded,
        "rss_at_10_25_50_75_100pct_mb": [at(f) for f in (0.1, 0.25, 0.5, 0.75, 1.0)],
        "rss_max_during_stream_mb": max(s[1] for s in samples),
        "peak_rss_mb": _proc_status("VmHWM"),
        "video_capacity_max_tokens": res.video_capacity_max,
        "video_cache_max_mb": res.video_capacity_max * per_token / 2**20,
        "messages": res.messages[:5],
    }
    print(json.dumps(finite_json(out)), flush=True)
    return 0


def memory(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m tays memory", description="peak memory of a long vs a short "
                                 "sped-up TaYS stream with a visual window, each in a fresh process")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--long", type=float, default=3600.0, help="seconds of the long stream")
    ap.add_argument("--short", type=float, default=300.0, help="seconds of the short stream")
    ap.add_argument("--fps", type=float, default=2.0)
    ap.add_argument("--window", type=int, default=8, help="visual window in frame groups")
    ap.add_argument("--model", default=None)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    runs: dict[str, Any] = {}
    for label, dur in (("short", args.short), ("long", args.long)):
        cmd = [sys.executable, "-m", "tays", "memory-run", "--duration", str(dur), "--fps", str(args.fps),
               "--window", str(args.window), "--max-new-tokens", str(args.max_new_tokens)]
        if args.model:
            cmd += ["--model", args.model]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        _log(f"{label}: {dur:g} s stream at {args.fps:g} FPS, window {args.window} ...")
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT))
        lines = [ln for ln in p.stdout.splitlines() if ln.strip()]
        if p.returncode != 0 or not lines:
            _log(p.stderr[-2000:])
            raise SystemExit(f"memory-run for {dur:g} s failed (exit {p.returncode})")
        runs[label] = json.loads(lines[-1])
        r = runs[label]
        _log(f"  {r['frames']} frames in {r['wall_s']:.1f} s; peak RSS {r['peak_rss_mb']:.1f} MiB, "
             f"max during stream {r['rss_max_during_stream_mb']:.1f} MiB, video cache <= {r['video_cache_max_mb']:.2f} MiB")
    s, l = runs["short"], runs["long"]
    out = {
        "measure": "peak RSS (VmHWM of /proc/self/status) of a fresh process per stream, model load included; "
                   "also RSS sampled every 0.1 s during the stream",
        "short": s, "long": l,
        "peak_rss_ratio": l["peak_rss_mb"] / s["peak_rss_mb"],
        "peak_within_10pct": l["peak_rss_mb"] <= 1.10 * s["peak_rss_mb"],
        "stream_rss_ratio": l["rss_max_during_stream_mb"] / s["rss_max_during_stream_mb"],
        "stream_growth_mb": {k: r["rss_max_during_stream_mb"] - r["rss_after_load_mb"] for k, r in runs.items()},
    }
    _log(f"peak ratio long/short {out['peak_rss_ratio']:.3f} (within 10%: {out['peak_within_10pct']})")
    print(json.dumps(finite_json(out)) if args.json else json.dumps(finite_json(out), indent=1), flush=True)
    return 0


def data(argv: list[str]) -> int:
    from tays.data import main as data_main

    return data_main(argv)


def train(argv: list[str]) -> int:
    from tays.train import main as train_main

    return train_main(argv)


def evaluate(argv: list[str]) -> int:
    from tays.evaluate import main as evaluate_main

    return evaluate_main(argv)


COMMANDS = {
    "bench": (bench, "TTFT / delay / throughput of batch, interleaved and TaYS at several FPS"),
    "data": (data, "build streaming CoT trajectories (shapes world or VideoEspresso JSON), count skips"),
    "train": (train, "SFT of the demo model for streaming reasoning: --paradigm tays | batch | interleaved"),
    "evaluate": (evaluate, "accuracy, event deviation, TTFT and delay of the trained paradigms on held-out streams"),
    "memory": (memory, "peak memory of a one-hour vs a five-minute sped-up stream with a visual window"),
    "memory-run": (memory_run, "one memory measurement in this process (used by `memory`)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: python -m tays <command> [options]\n\ncommands:")
        for name, (_, help_) in COMMANDS.items():
            print(f"  {name:12s} {help_}")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    return COMMANDS[argv[0]][0](argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
