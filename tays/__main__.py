"""Command line: python -m tays <command> [options].

    python -m tays bench --json [--fps 1 2 3 4 5] [--duration 12] [--model PATH]
    python -m tays memory --json [--long 3600] [--short 300] [--window 8]
    python -m tays data [--annotations FILE.json | --shapes N] [--out trajectories.jsonl]
    python -m tays train --paradigm {tays,batch,interleaved} --steps N --minutes M --out DIR
    python -m tays attribute-eval --json [--n 100] [--estimator FILE] [--workers W]
    python -m tays attribute-labels [--n 60] --out runs/video-labels; python -m tays train-attribution
    python -m tays evaluate --json [--n 200] [--tays DIR] [--batch DIR] [--interleaved DIR] [--speed S]

Each command parses its options here and calls its library function (`tays.bench`, `tays.data`,
`tays.train`, `tays.evaluate`); a command with --json prints its result as one JSON object on the
LAST line of stdout (else indented), progress goes to stderr. What each measures: the modules'
docstrings.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from tays.bench import DEFAULT_MODEL, bench, memory, memory_run, set_threads, trace_memory
from tays.data import DEFAULT_FPS, DEFAULT_THRESHOLD, EncoderError, build_dataset, make_encoder
from tays.metrics import finite_json
from tays.protocol import PARADIGMS, TRAINED
from vstream.model import VLMError
from vstream.world.assets import DEMO_ESTIMATOR_MEAN, TAYS_MODEL_DIR, VIDEO_ESTIMATOR, watching_estimator


def _print_json(out: dict[str, Any], one_line: bool) -> None:
    print(json.dumps(finite_json(out)) if one_line else json.dumps(finite_json(out), indent=1), flush=True)


def bench_command(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m tays bench",
        description="TTFT / delay / throughput of the three paradigms on one shapes-world stream replayed in real time",
    )
    ap.add_argument("--json", action="store_true", help="print the results as one JSON object on the last line")
    ap.add_argument("--fps", type=float, nargs="+", default=[1, 2, 3, 4, 5])
    ap.add_argument("--duration", type=float, default=12.0, help="stream length in seconds (>= 5)")
    ap.add_argument("--model", default=None, help=f"model folder (default {DEFAULT_MODEL})")
    ap.add_argument("--paradigms", nargs="+", default=list(PARADIGMS), choices=list(PARADIGMS))
    ap.add_argument("--seed", type=int, default=0, help="index into the held-out stream seeds")
    ap.add_argument("--question-at", type=float, default=1.0, help="seconds after stream start the question arrives")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--step-tokens", type=int, default=8)
    ap.add_argument("--answer-tokens", type=int, default=8)
    ap.add_argument("--speed", type=float, default=1.0, help="replay speed (1 = real time)")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: the decoding and "
        "the ingestion thread get a core each; 0: torch default)",
    )
    ap.add_argument("--contention-steps", type=int, default=128)
    ap.add_argument(
        "--random-init",
        default=None,
        metavar="NAME",
        help="Qwen2.5-VL at its published size with random weights: qwen2.5-vl-3b or qwen2.5-vl-7b",
    )
    ap.add_argument("--reduced", action="store_true", help="with --random-init: its reduced size (a CPU)")
    ap.add_argument(
        "--lengths",
        type=int,
        nargs="+",
        default=None,
        help="instead of the paradigm table: peak memory and decode speed against these trace lengths",
    )
    ap.add_argument(
        "--attribute",
        action="store_true",
        help="also replay TaYS with attribution while watching at each FPS (tays_attributed): delay, "
        "decode speed and TTFT against the plain TaYS run (default model: the shipped TaYS model)",
    )
    ap.add_argument("--estimator", default=None, help="estimator for --attribute (as attribute-eval)")
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="replays per paradigm and FPS (order alternating); figures are medians over them",
    )
    args = ap.parse_args(argv)
    try:
        if args.lengths:
            set_threads(args.threads)
            out = trace_memory(args.lengths, args.model, args.random_init, args.reduced)
        else:
            out = _bench(args)
    except (VLMError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _print_json(out, args.json)
    return 0


def _bench(args: argparse.Namespace) -> dict[str, Any]:
    return bench(
        args.model or (str(TAYS_MODEL_DIR) if args.attribute else None),  # attribution: the TaYS model
        args.fps,
        args.duration,
        args.paradigms,
        args.seed,
        args.question_at,
        args.max_new_tokens,
        args.step_tokens,
        args.answer_tokens,
        args.speed,
        args.threads,
        args.contention_steps,
        args.random_init,
        args.reduced,
        attribute=args.attribute,
        estimator=args.estimator or str(watching_estimator()),
        repeat=args.repeat,
    )


def memory_command(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m tays memory",
        description="peak memory of a long vs a short "
        "sped-up TaYS stream with a visual window, each in a fresh process",
    )
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--long", type=float, default=3600.0, help="seconds of the long stream")
    ap.add_argument("--short", type=float, default=300.0, help="seconds of the short stream")
    ap.add_argument("--fps", type=float, default=2.0)
    ap.add_argument("--window", type=int, default=8, help="visual window in frame groups")
    ap.add_argument("--model", default=None)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    out = memory(args.long, args.short, args.fps, args.window, args.model, args.max_new_tokens, args.threads)
    _print_json(out, args.json)
    return 0


def memory_run_command(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m tays memory-run")
    ap.add_argument("--duration", type=float, required=True)
    ap.add_argument("--fps", type=float, default=2.0)
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--model", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    out = memory_run(args.duration, args.fps, args.window, args.model, args.seed, args.max_new_tokens, args.threads)
    _print_json(out, True)
    return 0


def data_command(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m tays data",
        description="build streaming CoT trajectories and report what was kept and skipped (last line: JSON)",
    )
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--annotations", type=Path, help="VideoEspresso-style annotation JSON")
    src.add_argument("--shapes", type=int, default=100, help="this many training-split shapes-world streams")
    ap.add_argument("--start", type=int, default=0, help="first training stream index (--shapes)")
    ap.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD)
    ap.add_argument("--encoder", default="tfidf", help="'tfidf' or a Hugging Face encoder id/path (e.g. BAAI/bge-m3)")
    ap.add_argument("--fps", type=float, default=DEFAULT_FPS)
    ap.add_argument("--out", type=Path, default=None, help="write the trajectories as JSON lines here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s", stream=sys.stderr)
    try:
        encoder = make_encoder(args.encoder)
    except EncoderError as e:
        raise SystemExit(f"data: {e}") from None
    summary = build_dataset(encoder, args.annotations, args.shapes, args.start, args.threshold, args.fps, args.out)
    print(json.dumps(summary), flush=True)
    return 0


def train_command(argv: list[str]) -> int:
    # imported when run, not at the top: training brings accelerate, which other commands never need
    from tays.train import SetupError, train

    ap = argparse.ArgumentParser(
        prog="python -m tays train",
        description="SFT of the demo model for streaming video reasoning (TaYS, or the batch / interleaved baselines)",
    )
    ap.add_argument("--paradigm", choices=PARADIGMS, default="tays")
    ap.add_argument("--steps", type=int, default=600, help="optimizer steps (the LR schedule spans these)")
    ap.add_argument("--minutes", type=float, default=None, help="stop early after this much wall time")
    ap.add_argument("--out", type=Path, default=None, help="final model folder (default runs/tays/PARADIGM)")
    ap.add_argument("--model", default=str(DEFAULT_MODEL), help="start from this model folder")
    ap.add_argument("--batch-size", type=int, default=8, help="streams per step per process")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--run-dir", type=Path, default=None, help="checkpoints for resuming (default OUT.run)")
    ap.add_argument("--save-every", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seed-start", type=int, default=0, help="first training-split stream index")
    ap.add_argument("--duration", type=float, default=None, help="stream length in s (default: seeded 8-20 s)")
    ap.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD, help="question/step consistency threshold")
    ap.add_argument("--encoder", default="tfidf", help="'tfidf' (offline) or a Hugging Face encoder id/path (BGE-M3)")
    ap.add_argument("--save-dtype", choices=["float16", "bfloat16", "float32"], default="float16")
    ap.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: torch default)")
    ap.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (render + preprocess frames)")
    ap.add_argument(
        "--empty-step-weight",
        type=float,
        default=1.0,
        help='loss weight of an empty step\'s end-of-step token ("nothing new"), against 1 for every '
        "other token. The streaming layouts are mostly such steps; batch traces have none, so "
        "batch training is the same whatever this is",
    )
    ap.add_argument(
        "--answer-weight",
        type=float,
        default=1.0,
        help="loss weight of the answer tokens (after </think>, with the final end), against 1. "
        "They are a few tokens of each trace, yet they are what accuracy measures",
    )
    args = ap.parse_args(argv)
    try:
        meta = train(**vars(args))
    except SetupError as e:
        raise SystemExit(f"train: {e}") from None
    if meta is not None:  # the main process
        print(json.dumps(meta))
    return 0


def evaluate_command(argv: list[str]) -> int:
    # imported when run, not at the top: evaluation brings the eval-model stack (transformers, seconds to import)
    from tays.evaluate import EVAL_PARADIGMS, CheckpointError, evaluate_checkpoints

    ap = argparse.ArgumentParser(
        prog="python -m tays evaluate",
        description="accuracy, reasoning-event deviation, "
        "TTFT and delay of the trained paradigms on held-out shapes-world streams",
    )
    ap.add_argument("--json", action="store_true", help="print the results as one JSON object on the last line")
    ap.add_argument("--n", type=int, default=200, help="streams to replay (from --split)")
    ap.add_argument("--start", type=int, default=0, help="first stream index in the split")
    ap.add_argument(
        "--split",
        default="heldout",
        choices=("heldout", "val"),
        help="held-out streams (the reported "
        "figures) or validation streams (never trained on: for choosing training settings)",
    )
    ap.add_argument("--tays", default="runs/tays/tays", help="TaYS checkpoint folder")
    ap.add_argument("--batch", default="runs/tays/batch", help="batch-SFT checkpoint folder")
    ap.add_argument("--interleaved", default="runs/tays/interleaved", help="interleaved-SFT checkpoint folder")
    ap.add_argument("--no-think", default=None, help="checkpoint for batch_no_think (default: --batch)")
    ap.add_argument("--paradigms", nargs="+", default=list(EVAL_PARADIGMS), choices=EVAL_PARADIGMS)
    ap.add_argument("--fps", type=float, default=2.0)
    ap.add_argument(
        "--device", default="cpu", help="cpu, cuda or cuda:N (models load in their default dtype: bfloat16 on CUDA)"
    )
    ap.add_argument("--speed", type=float, default=1.0, help="replay speed (1 = real time)")
    ap.add_argument("--duration", type=float, default=None, help="stream length in s (default: seeded 8-20 s)")
    ap.add_argument("--question-at", type=float, default=0.0)
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--step-tokens", type=int, default=TRAINED["step_tokens"])
    ap.add_argument("--answer-tokens", type=int, default=TRAINED["answer_tokens"])
    ap.add_argument("--warmup", type=int, default=1, help="untimed warm-up runs per paradigm (not real time)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch default)")
    ap.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes replaying streams concurrently, each in real "
        "time (they share the CPU: the timings include that)",
    )
    args = ap.parse_args(argv)
    if args.n < 1:
        raise SystemExit("evaluate: --n must be >= 1")
    if args.workers < 1:
        raise SystemExit("evaluate: --workers must be >= 1")
    dirs = {
        "tays": args.tays,
        "batch": args.batch,
        "interleaved": args.interleaved,
        "batch_no_think": args.no_think or args.batch,
    }
    try:
        res = evaluate_checkpoints(
            {p: dirs[p] for p in args.paradigms},
            args.n,
            args.start,
            args.split,
            args.fps,
            args.device,
            args.speed,
            args.duration,
            args.question_at,
            args.max_new_tokens,
            args.step_tokens,
            args.answer_tokens,
            args.warmup,
            args.threads,
            args.workers,
        )
    except CheckpointError as e:
        raise SystemExit(f"evaluate: {e}") from None
    _print_json(res, args.json)
    return 0


DEFAULT_VIDEO_ESTIMATOR = str(VIDEO_ESTIMATOR)
STILL_ESTIMATOR = str(DEMO_ESTIMATOR_MEAN)  # watching computes the paper's mean features only


def _attr_args(ap: argparse.ArgumentParser, n: int, split: str) -> None:
    ap.add_argument("--model", default=None, help=f"TaYS model folder (default {TAYS_MODEL_DIR})")
    ap.add_argument("--n", type=int, default=n, help="streams to replay")
    ap.add_argument("--start", type=int, default=0, help="first stream index in the split")
    ap.add_argument("--split", default=split, choices=("train", "val", "heldout"))
    ap.add_argument("--fps", type=float, default=2.0)
    ap.add_argument("--speed", type=float, default=1.0, help="replay speed (1 = real time)")
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--masks", type=int, default=16, help="random region ablations per stream (LDS, labels)")
    ap.add_argument("--batch", type=int, default=16, help="teacher-forced sequences per forward")
    ap.add_argument("--workers", type=int, default=1, help="processes replaying streams at once (share the CPU)")


def attribute_eval_command(argv: list[str]) -> int:
    from tays.watch_eval import evaluate_streams

    ap = argparse.ArgumentParser(
        prog="python -m tays attribute-eval",
        description="attribution while watching on held-out streams: temporal and spatial pointing, LDS "
        "against measured ablations (vstream, raw attention, occlusion), chance, decode overhead",
    )
    ap.add_argument("--json", action="store_true", help="print the results as one JSON object on the last line")
    _attr_args(ap, 100, "heldout")
    ap.add_argument(
        "--estimator",
        default=None,
        help=f"estimator file (default {DEFAULT_VIDEO_ESTIMATOR} if it exists, else the still-image {STILL_ESTIMATOR})",
    )
    ap.add_argument("--overhead-streams", type=int, default=10, help="streams also replayed without attribution")
    ap.add_argument("--occlusion-streams", type=int, default=None, help="streams given the occlusion baseline (all)")
    ap.add_argument(
        "--compare",
        nargs="+",
        default=[],
        metavar="FILE",
        help="more estimator files scored on the same replays, each as a method named after the file "
        "(choose among candidates on --split val)",
    )
    args = ap.parse_args(argv)
    est = args.estimator or str(watching_estimator())
    res = evaluate_streams(
        str(args.model or TAYS_MODEL_DIR),
        est,
        n=args.n,
        start=args.start,
        split=args.split,
        overhead_streams=args.overhead_streams,
        occlusion_streams=args.occlusion_streams,
        workers=args.workers,
        fps=args.fps,
        speed=args.speed,
        max_new_tokens=args.max_new_tokens,
        masks=args.masks,
        batch=args.batch,
        compare=args.compare,
    )
    _print_json(res, args.json)
    return 0


def attribute_labels_command(argv: list[str]) -> int:
    from tays.watch_eval import evaluate_streams

    ap = argparse.ArgumentParser(
        prog="python -m tays attribute-labels",
        description="video attribution labels: replay training streams with capture, then measure random "
        "region ablations of chosen frame groups, teacher-forced on the generated trajectory",
    )
    _attr_args(ap, 60, "train")
    ap.add_argument("--out", default="runs/video-labels", help="folder for video-labels-SEED.safetensors")
    args = ap.parse_args(argv)
    res = evaluate_streams(
        str(args.model or TAYS_MODEL_DIR),
        None,
        n=args.n,
        start=args.start,
        split=args.split,
        overhead_streams=0,
        occlusion_streams=0,
        workers=args.workers,
        labels_out=args.out,
        fps=args.fps,
        speed=args.speed,
        max_new_tokens=args.max_new_tokens,
        masks=args.masks,
        batch=args.batch,
    )
    print(json.dumps({"labels": args.out, "streams": res["streams"], "spans": res["lds_spans"]}))
    return 0


def train_attribution_command(argv: list[str]) -> int:
    from tays.watch_eval import train_video_estimator
    from vstream.model import load_vlm

    ap = argparse.ArgumentParser(
        prog="python -m tays train-attribution",
        description="train the vSTREAM estimator on video labels (python -m tays attribute-labels)",
    )
    ap.add_argument("--labels", nargs="+", default=["runs/video-labels"])
    ap.add_argument("--model", default=None, help=f"TaYS model folder (default {TAYS_MODEL_DIR})")
    ap.add_argument("--out", default=DEFAULT_VIDEO_ESTIMATOR)
    ap.add_argument("--epochs", type=int, default=200)
    ap.add_argument(
        "--anchor",
        type=float,
        default=0.0,
        help="penalty on the map's direction leaving raw attention's (choose it on validation streams)",
    )
    ap.add_argument(
        "--columns",
        default="all",
        help="feature columns the map may use: all, layers=A-B or top=N (ranked on the training labels)",
    )
    args = ap.parse_args(argv)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    vlm = load_vlm(str(args.model or TAYS_MODEL_DIR))
    try:
        _, report = train_video_estimator(
            args.labels, args.out, vlm, epochs=args.epochs, anchor=args.anchor, columns=args.columns, progress=False
        )
    except VLMError as e:
        raise SystemExit(f"train-attribution: {e}") from None
    print(json.dumps(finite_json({"out": args.out, **{k: v for k, v in report.items() if k != "heldout"}})))
    return 0


COMMANDS = {
    "bench": (bench_command, "TTFT / delay / throughput of batch, interleaved and TaYS at several FPS"),
    "data": (data_command, "build streaming CoT trajectories (shapes world or VideoEspresso JSON), count skips"),
    "train": (train_command, "SFT of the demo model for streaming reasoning: --paradigm tays | batch | interleaved"),
    "evaluate": (
        evaluate_command,
        "accuracy, event deviation, TTFT and delay of the trained paradigms on held-out streams",
    ),
    "attribute-eval": (
        attribute_eval_command,
        "attribution while watching: temporal / spatial pointing, LDS, chance, overhead on held-out streams",
    ),
    "attribute-labels": (attribute_labels_command, "video attribution labels (ablations) on training streams"),
    "train-attribution": (train_attribution_command, "train the attribution estimator on video labels"),
    "memory": (memory_command, "peak memory of a one-hour vs a five-minute sped-up stream with a visual window"),
    "memory-run": (memory_run_command, "one memory measurement in this process (used by `memory`)"),
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
