"""Held-out evaluation of the trained streaming paradigms (issue 5, item 3).

    python -m tays evaluate --json --n 200                     # real-time replay at 2 FPS
    python -m tays evaluate --json --n 200 --workers 8         # 8 streams replayed at once, each in real time
    python -m tays evaluate --json --n 20 --speed 4            # quicker: streams replayed 4x
    python -m tays evaluate --json --split val                 # validation streams, for choosing settings

Each held-out shapes-world stream (`vstream.world.shapes_video`, held-out seeds only; a checkpoint whose
training.json overlaps them is refused; `--split val` takes validation streams instead, which no
training run uses, so that training settings can be chosen without looking at held-out) is
replayed at 2 FPS through `tays.paradigms.run_paradigm` for every paradigm, with the checkpoint
trained for it (`python -m tays train`):

* ``tays``: the StreamingEngine (dual KV cache) on the TaYS checkpoint;
* ``interleaved``: one causal sequence, frames and steps alternating, on the interleaved checkpoint;
* ``batch``: all frames, then the reasoning (ended by the model's ``</think>``), then the answer;
* ``batch_no_think``: the batch checkpoint answering right after ``<think></think>`` (no reasoning).

Reasoning protocol (that of `tays.train`): a step ends at the end-of-step token ``<|eot|>`` (or
after --step-tokens tokens), the answer follows ``</think>``. The last line printed with --json
is ``{paradigm: {"accuracy", "event_deviation_s", "ttft_s", "delay_s", ...}, "meta": {...}}``:

* accuracy: share of streams whose answer (lower-cased, punctuation removed) equals the truth;
* event_deviation_s: mean |step emission - event time| (stream seconds) over every reasoning step
  matched to a ground-truth event (`tays.metrics.match_event`), pooled over streams;
* ttft_s / delay_s: means over streams of the wall seconds from stream start to the first token /
  to the last answer token (`tays.metrics`); with --speed S the stream plays S times faster, the
  model does not, so only --speed 1 gives the real-time figures. With --workers W, W processes
  replay different streams at the same time (each still in real time, each with its own models);
  they share the CPU, so their TTFT and delay include that contention (meta.workers says W).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from tays.metrics import finite_json
from tays.protocol import TRAINED
from vstream.model import normalize_answer

__all__ = ["EVAL_PARADIGMS", "evaluate_models", "main"]

EVAL_PARADIGMS = ("tays", "batch", "interleaved", "batch_no_think")
RUNNER = {"tays": "tays", "batch": "batch", "interleaved": "interleaved", "batch_no_think": "batch"}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _mean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(xs) / len(xs) if xs else None


def run_one(vlm: Any, stream: Any, paradigm: str, *, fps: float = 2.0, speed: float = 1.0, realtime: bool = True,
            max_new_tokens: int = 160, step_tokens: int = TRAINED["step_tokens"],
            answer_tokens: int = TRAINED["answer_tokens"], question_at: float = 0.0):
    """One stream through one evaluated paradigm, with the SFT protocol; returns the RunResult."""
    from tays.paradigms import run_paradigm
    from tays.sources import ShapesSource

    src = ShapesSource(stream, fps=fps, realtime=realtime, speed=speed)
    no_think = paradigm == "batch_no_think"
    opts = dict(TRAINED, step_tokens=step_tokens, answer_tokens=answer_tokens)
    return run_paradigm(
        vlm, src, stream.question, RUNNER[paradigm],
        max_new_tokens=answer_tokens if no_think else max_new_tokens, question_at=question_at,
        model_ends_reasoning=paradigm == "batch", **opts,
    )


def eval_stream(models: dict[str, Any], stream: Any, **kw: Any) -> dict[str, dict[str, Any]]:
    """{paradigm: record} for one stream: the raw figures `summarize` pools."""
    recs: dict[str, dict[str, Any]] = {}
    for p, vlm in models.items():
        r = run_one(vlm, stream, p, **kw)
        m = r.metrics
        k = m.get("steps_matched") or 0
        dev = m.get("event_deviation_s")
        recs[p] = {
            "seed": stream.seed, "correct": normalize_answer(r.answer) == normalize_answer(stream.answer),
            "ttft": m.get("ttft_s"), "delay": m.get("delay_s"),
            "dev_sum": dev * k if k and dev is not None else 0.0, "matched": k if dev is not None else 0,
            "deviation": dev, "tokens": m.get("tokens") or 0, "steps": len([s for s in r.steps if s.text]),
            "messages": r.messages[:2],
            "example": {"seed": stream.seed, "question": stream.question, "truth": stream.answer,
                        "text": r.text, "answer": r.answer},
        }
    return recs


def summarize(records: list[dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """Pool per-stream records (in stream order) into {paradigm: metrics}."""
    out: dict[str, Any] = {}
    for p in (records[0] if records else {}):
        rs = [r[p] for r in records]
        matched = sum(r["matched"] for r in rs)
        out[p] = {
            "accuracy": sum(r["correct"] for r in rs) / len(rs),
            "event_deviation_s": sum(r["dev_sum"] for r in rs) / matched if matched else None,
            "ttft_s": _mean([r["ttft"] for r in rs]),
            "delay_s": _mean([r["delay"] for r in rs]),
            "n": len(rs),
            "steps_matched": matched,
            "nonempty_steps_per_stream": _mean([float(r["steps"]) for r in rs]),
            "tokens_per_stream": _mean([float(r["tokens"]) for r in rs]),
            "examples": [r["example"] for r in rs[:3]],
            "messages": [m for r in rs for m in r["messages"]][:5],
        }
    return out


def _progress(i: int, n: int, stream: Any, recs: dict[str, dict[str, Any]]) -> None:
    for p, r in recs.items():
        _log(f"[{i + 1}/{n}] {p:14s} seed {stream.seed}: {'ok ' if r['correct'] else 'bad'} answer "
             f"{r['example']['answer'].strip()!r} (truth {stream.answer!r}); ttft {r['ttft']}, delay {r['delay']}, "
             f"deviation {r['deviation']}")


def evaluate_models(models: dict[str, Any], n: int = 200, start: int = 0, duration: float | None = None,
                    progress: bool = True, split: str = "heldout", **kw: Any) -> dict[str, Any]:
    """{paradigm: metrics} over `n` streams of `split` (held-out by default; "val" for choosing
    training settings); `models` maps each evaluated paradigm to its VLM. kw: run_one's options."""
    from vstream.world.shapes_video import streams

    records = []
    for i, stream in enumerate(streams(split, start, n, duration)):
        records.append(eval_stream(models, stream, **kw))
        if progress:
            _progress(i, n, stream, records[-1])
    return summarize(records)


def _worker(job: dict[str, Any]) -> list[tuple[int, dict[str, dict[str, Any]]]]:
    """One replay process of --workers: loads its own models, replays streams start+w, +W, ..."""
    import torch

    from vstream.world.shapes_video import streams

    torch.set_num_threads(job["threads"] or 1)
    models = _load_all(job["dirs"], job["paradigms"], job["split"], job["device"])
    kw = job["kw"]
    _warm_up(models, job["split"], job["start"], job["duration"], job["warmup"], kw)
    out = []
    for i in range(job["worker"], job["n"], job["workers"]):
        stream = streams(job["split"], job["start"] + i, 1, job["duration"])[0]
        out.append((i, eval_stream(models, stream, **kw)))
        _progress(i, job["n"], stream, out[-1][1])
    return out


def evaluate_parallel(dirs: dict[str, str], paradigms: list[str], split: str, n: int, start: int,
                      duration: float | None, workers: int, threads: int, warmup: int, device: str = "cpu",
                      **kw: Any) -> dict[str, Any]:
    """evaluate_models over `workers` processes replaying streams concurrently (each in real time;
    they share the CPU, so timings include that contention)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    jobs = [{"dirs": dirs, "paradigms": paradigms, "split": split, "n": n, "start": start, "duration": duration,
             "worker": w, "workers": workers, "threads": threads, "warmup": warmup, "device": device, "kw": kw}
            for w in range(workers)]
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        parts = list(pool.map(_worker, jobs))
    return summarize([rec for _, rec in sorted((x for part in parts for x in part), key=lambda x: x[0])])


def _load(path: str, paradigm: str, split: str, device: str = "cpu"):
    from vstream.world.eval_model import check_heldout
    from vstream.model import VLMError, load_vlm

    p = Path(path)
    if not (p / "config.json").is_file():
        raise SystemExit(f"evaluate: no checkpoint for {paradigm!r} at {p} (train one with: python -m tays train "
                         f"--paradigm {RUNNER[paradigm]} --out {p}; or pass --{RUNNER[paradigm]} DIR)")
    try:
        check_heldout(p, split)
        return load_vlm(str(p), device=device)
    except VLMError as e:
        raise SystemExit(f"evaluate: {paradigm}: {e}") from None


def _load_all(dirs: dict[str, str], paradigms: list[str], split: str, device: str = "cpu") -> dict[str, Any]:
    """{paradigm: VLM}, each checkpoint folder loaded once."""
    loaded: dict[str, Any] = {}
    models: dict[str, Any] = {}
    for p in paradigms:
        key = str(Path(dirs[p]).resolve())
        if key not in loaded:
            loaded[key] = _load(dirs[p], p, split, device)
        models[p] = loaded[key]
    return models


def _warm_up(models: dict[str, Any], split: str, start: int, duration: float | None, runs: int,
             kw: dict[str, Any]) -> None:
    """Untimed, not-real-time runs first, so the timed ones do not pay for lazy set-up."""
    from vstream.world.shapes_video import streams

    if runs:
        ws = streams(split, start, 1, duration)[0]
        for p, vlm in models.items():
            for _ in range(runs):
                run_one(vlm, ws, p, realtime=False, **{k: v for k, v in kw.items() if k != "speed"})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tays evaluate", description="accuracy, reasoning-event deviation, "
                                 "TTFT and delay of the trained paradigms on held-out shapes-world streams")
    ap.add_argument("--json", action="store_true", help="print the results as one JSON object on the last line")
    ap.add_argument("--n", type=int, default=200, help="streams to replay (from --split)")
    ap.add_argument("--start", type=int, default=0, help="first stream index in the split")
    ap.add_argument("--split", default="heldout", choices=("heldout", "val"), help="held-out streams (the reported "
                    "figures) or validation streams (never trained on: for choosing training settings)")
    ap.add_argument("--tays", default="runs/tays/tays", help="TaYS checkpoint folder")
    ap.add_argument("--batch", default="runs/tays/batch", help="batch-SFT checkpoint folder")
    ap.add_argument("--interleaved", default="runs/tays/interleaved", help="interleaved-SFT checkpoint folder")
    ap.add_argument("--no-think", default=None, help="checkpoint for batch_no_think (default: --batch)")
    ap.add_argument("--paradigms", nargs="+", default=list(EVAL_PARADIGMS), choices=EVAL_PARADIGMS)
    ap.add_argument("--fps", type=float, default=2.0)
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (models load in their default dtype: "
                    "bfloat16 on CUDA)")
    ap.add_argument("--speed", type=float, default=1.0, help="replay speed (1 = real time)")
    ap.add_argument("--duration", type=float, default=None, help="stream length in s (default: seeded 8-20 s)")
    ap.add_argument("--question-at", type=float, default=0.0)
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--step-tokens", type=int, default=TRAINED["step_tokens"])
    ap.add_argument("--answer-tokens", type=int, default=TRAINED["answer_tokens"])
    ap.add_argument("--warmup", type=int, default=1, help="untimed warm-up runs per paradigm (not real time)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch default)")
    ap.add_argument("--workers", type=int, default=1, help="processes replaying streams concurrently, each in real "
                    "time (they share the CPU: the timings include that)")
    args = ap.parse_args(argv)
    if args.n < 1:
        raise SystemExit("evaluate: --n must be >= 1")
    if args.workers < 1:
        raise SystemExit("evaluate: --workers must be >= 1")

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    dirs = {"tays": args.tays, "batch": args.batch, "interleaved": args.interleaved,
            "batch_no_think": args.no_think or args.batch}
    dirs = {p: dirs[p] for p in args.paradigms}
    models = _load_all(dirs, args.paradigms, args.split, args.device)  # check every folder before the long part
    kw = dict(fps=args.fps, speed=args.speed, max_new_tokens=args.max_new_tokens, step_tokens=args.step_tokens,
              answer_tokens=args.answer_tokens, question_at=args.question_at)
    if args.workers > 1:
        del models
        res = evaluate_parallel(dirs, args.paradigms, args.split, args.n, args.start, args.duration, args.workers,
                                args.threads, args.warmup, args.device, **kw)
    else:
        _warm_up(models, args.split, args.start, args.duration, args.warmup, kw)
        res = evaluate_models(models, args.n, args.start, args.duration, progress=True, split=args.split, **kw)
    res["meta"] = {
        "checkpoints": {p: str(dirs[p]) for p in args.paradigms}, "n": args.n, "split": args.split,
        "start": args.start, "fps": args.fps, "speed": args.speed, "duration": args.duration,
        "question_at_s": args.question_at, "max_new_tokens": args.max_new_tokens, "step_tokens": args.step_tokens,
        "answer_tokens": args.answer_tokens, "torch_threads": torch.get_num_threads(), "workers": args.workers,
        "device": args.device,
        "wall_s": time.perf_counter() - t0,
        "times": "ttft_s / delay_s: wall seconds since stream start; event_deviation_s: stream seconds",
    }
    for p in args.paradigms:
        r = res[p]
        _log(f"{p:14s} accuracy {r['accuracy']}, event deviation {r['event_deviation_s']} s, "
             f"ttft {r['ttft_s']} s, delay {r['delay_s']} s")
    print(json.dumps(finite_json(res)) if args.json else json.dumps(finite_json(res), indent=1), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
