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

import math
import multiprocessing as mp
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

from tays.metrics import RunResult
from tays.paradigms import run_paradigm
from tays.protocol import TRAINED
from tays.sources import ShapesSource
from vstream.model import VLM, VLMError, load_vlm, normalize_answer
from vstream.world.eval_model import check_heldout
from vstream.world.shapes_video import Stream, streams

__all__ = ["EVAL_PARADIGMS", "CheckpointError", "evaluate_checkpoints", "evaluate_models"]

EVAL_PARADIGMS = ("tays", "batch", "interleaved", "batch_no_think")
RUNNER = {"tays": "tays", "batch": "batch", "interleaved": "interleaved", "batch_no_think": "batch"}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _mean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(xs) / len(xs) if xs else None


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be evaluated (missing, trained on the evaluated split, or
    not loadable on the device). The message is one line."""


def run_one(
    vlm: VLM,
    stream: Stream,
    paradigm: str,
    *,
    fps: float = 2.0,
    speed: float = 1.0,
    realtime: bool = True,
    max_new_tokens: int = 160,
    step_tokens: int = TRAINED["step_tokens"],
    answer_tokens: int = TRAINED["answer_tokens"],
    question_at: float = 0.0,
) -> RunResult:
    """One stream through one evaluated paradigm, with the SFT protocol; returns the RunResult."""
    src = ShapesSource(stream, fps=fps, realtime=realtime, speed=speed)
    no_think = paradigm == "batch_no_think"
    opts = dict(TRAINED, step_tokens=step_tokens, answer_tokens=answer_tokens)
    return run_paradigm(
        vlm,
        src,
        stream.question,
        RUNNER[paradigm],
        max_new_tokens=answer_tokens if no_think else max_new_tokens,
        question_at=question_at,
        model_ends_reasoning=paradigm == "batch",
        **opts,
    )


def eval_stream(models: dict[str, VLM], stream: Stream, **kw: Any) -> dict[str, dict[str, Any]]:
    """{paradigm: record} for one stream: the raw figures `summarize` pools."""
    recs: dict[str, dict[str, Any]] = {}
    for p, vlm in models.items():
        r = run_one(vlm, stream, p, **kw)
        m = r.metrics
        k = m.get("steps_matched") or 0
        dev = m.get("event_deviation_s")
        recs[p] = {
            "seed": stream.seed,
            "correct": normalize_answer(r.answer) == normalize_answer(stream.answer),
            "ttft": m.get("ttft_s"),
            "delay": m.get("delay_s"),
            "dev_sum": dev * k if k and dev is not None else 0.0,
            "matched": k if dev is not None else 0,
            "deviation": dev,
            "tokens": m.get("tokens") or 0,
            "steps": len([s for s in r.steps if s.text]),
            "messages": r.messages[:2],
            "example": {
                "seed": stream.seed,
                "question": stream.question,
                "truth": stream.answer,
                "text": r.text,
                "answer": r.answer,
            },
        }
    return recs


def summarize(records: list[dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """Pool per-stream records (in stream order) into {paradigm: metrics}."""
    out: dict[str, Any] = {}
    for p in records[0] if records else {}:
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


def _progress(i: int, n: int, stream: Stream, recs: dict[str, dict[str, Any]]) -> None:
    for p, r in recs.items():
        _log(
            f"[{i + 1}/{n}] {p:14s} seed {stream.seed}: {'ok ' if r['correct'] else 'bad'} answer "
            f"{r['example']['answer'].strip()!r} (truth {stream.answer!r}); ttft {r['ttft']}, delay {r['delay']}, "
            f"deviation {r['deviation']}"
        )


def evaluate_models(
    models: dict[str, VLM],
    n: int = 200,
    start: int = 0,
    duration: float | None = None,
    progress: bool = True,
    split: str = "heldout",
    **kw: Any,
) -> dict[str, Any]:
    """{paradigm: metrics} over `n` streams of `split` (held-out by default; "val" for choosing
    training settings); `models` maps each evaluated paradigm to its VLM. kw: run_one's options."""
    records = []
    for i, stream in enumerate(streams(split, start, n, duration)):
        records.append(eval_stream(models, stream, **kw))
        if progress:
            _progress(i, n, stream, records[-1])
    return summarize(records)


def _worker(job: dict[str, Any]) -> list[tuple[int, dict[str, dict[str, Any]]]]:
    """One replay process of --workers: loads its own models, replays streams start+w, +W, ..."""
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


def evaluate_parallel(
    dirs: dict[str, str],
    paradigms: list[str],
    split: str,
    n: int,
    start: int,
    duration: float | None,
    workers: int,
    threads: int,
    warmup: int,
    device: str = "cpu",
    **kw: Any,
) -> dict[str, Any]:
    """evaluate_models over `workers` processes replaying streams concurrently (each in real time;
    they share the CPU, so timings include that contention)."""
    jobs = [
        {
            "dirs": dirs,
            "paradigms": paradigms,
            "split": split,
            "n": n,
            "start": start,
            "duration": duration,
            "worker": w,
            "workers": workers,
            "threads": threads,
            "warmup": warmup,
            "device": device,
            "kw": kw,
        }
        for w in range(workers)
    ]
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        parts = list(pool.map(_worker, jobs))
    return summarize([rec for _, rec in sorted((x for part in parts for x in part), key=lambda x: x[0])])


def _load(path: str, paradigm: str, split: str, device: str = "cpu") -> VLM:
    p = Path(path)
    if not (p / "config.json").is_file():
        raise CheckpointError(
            f"no checkpoint for {paradigm!r} at {p} (train one with: python -m tays train "
            f"--paradigm {RUNNER[paradigm]} --out {p}; or pass --{RUNNER[paradigm]} DIR)"
        )
    try:
        check_heldout(p, split)
        return load_vlm(str(p), device=device)
    except VLMError as e:
        raise CheckpointError(f"{paradigm}: {e}") from None


def _load_all(dirs: dict[str, str], paradigms: list[str], split: str, device: str = "cpu") -> dict[str, VLM]:
    """{paradigm: VLM}, each checkpoint folder loaded once."""
    loaded: dict[str, VLM] = {}
    models: dict[str, VLM] = {}
    for p in paradigms:
        key = str(Path(dirs[p]).resolve())
        if key not in loaded:
            loaded[key] = _load(dirs[p], p, split, device)
        models[p] = loaded[key]
    return models


def _warm_up(
    models: dict[str, VLM], split: str, start: int, duration: float | None, runs: int, kw: dict[str, Any]
) -> None:
    """Untimed, not-real-time runs first, so the timed ones do not pay for lazy set-up."""
    if runs:
        ws = streams(split, start, 1, duration)[0]
        for p, vlm in models.items():
            for _ in range(runs):
                run_one(vlm, ws, p, realtime=False, **{k: v for k, v in kw.items() if k != "speed"})


def evaluate_checkpoints(
    dirs: dict[str, str],
    n: int = 200,
    start: int = 0,
    split: str = "heldout",
    fps: float = 2.0,
    device: str = "cpu",
    speed: float = 1.0,
    duration: float | None = None,
    question_at: float = 0.0,
    max_new_tokens: int = 160,
    step_tokens: int = TRAINED["step_tokens"],
    answer_tokens: int = TRAINED["answer_tokens"],
    warmup: int = 1,
    threads: int = 1,
    workers: int = 1,
) -> dict[str, Any]:
    """{paradigm: metrics, "meta": {...}} of the checkpoints `dirs` ({evaluated paradigm: folder})
    over `n` streams of `split` (module docstring); every folder is checked before the long part.
    threads: torch threads (0: torch's default); workers: replay processes."""
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    paradigms = list(dirs)
    models = _load_all(dirs, paradigms, split, device)
    kw = dict(
        fps=fps,
        speed=speed,
        max_new_tokens=max_new_tokens,
        step_tokens=step_tokens,
        answer_tokens=answer_tokens,
        question_at=question_at,
    )
    if workers > 1:
        del models
        res = evaluate_parallel(dirs, paradigms, split, n, start, duration, workers, threads, warmup, device, **kw)
    else:
        _warm_up(models, split, start, duration, warmup, kw)
        res = evaluate_models(models, n, start, duration, progress=True, split=split, **kw)
    res["meta"] = {
        "checkpoints": {p: str(dirs[p]) for p in paradigms},
        "n": n,
        "split": split,
        "start": start,
        "fps": fps,
        "speed": speed,
        "duration": duration,
        "question_at_s": question_at,
        "max_new_tokens": max_new_tokens,
        "step_tokens": step_tokens,
        "answer_tokens": answer_tokens,
        "torch_threads": torch.get_num_threads(),
        "workers": workers,
        "device": device,
        "wall_s": time.perf_counter() - t0,
        "times": "ttft_s / delay_s: wall seconds since stream start; event_deviation_s: stream seconds",
    }
    for p in paradigms:
        r = res[p]
        _log(
            f"{p:14s} accuracy {r['accuracy']}, event deviation {r['event_deviation_s']} s, "
            f"ttft {r['ttft_s']} s, delay {r['delay_s']} s"
        )
    return res
