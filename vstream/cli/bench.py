"""python -m vstream bench"""

from __future__ import annotations

import argparse
import json
import sys

from vstream.attr import bench as bench_mod
from vstream.attr.bench import DEFAULT_ESTIMATOR, DEFAULT_START, bench, load_estimator
from vstream.attr.estimator_lookup import find_estimator
from vstream.attr.scale import DEFAULT_LENGTHS, bench_scale
from vstream.cli.model_options import add_load_options, load_from_args
from vstream.model import VLMError
from vstream.model.random_init import random_init_names, random_init_vlm
from vstream.world.assets import DEMO_MODEL_DIR


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vstream bench", description=(bench_mod.__doc__ or "").splitlines()[0])
    ap.add_argument("--model", default=str(DEMO_MODEL_DIR), help="model folder or Hugging Face id")
    ap.add_argument(
        "--estimator",
        default=None,
        help=f"estimator .safetensors (default {DEFAULT_ESTIMATOR.name}; random stand-in if absent)",
    )
    ap.add_argument("--estimators", default=None, help="folder of estimators: use the one that fits the model")
    ap.add_argument(
        "--n",
        type=int,
        default=96,
        help="held-out prompts per run (plus one warm-up); the decode-speed ratio of one run is noisy on "
        "shared CPUs, the more so the fewer prompts it has (compare --noise-floor)",
    )
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs over the same prompts in this process: overhead_ratio_median / _min over them",
    )
    ap.add_argument(
        "--worker",
        choices=["auto", "process", "thread"],
        default="auto",
        help="where live runs score spans (default: the attribution process where it can run)",
    )
    ap.add_argument(
        "--noise-floor",
        action="store_true",
        help="also decode plain twice per prompt: the plain/plain ratio per run is what the machine alone "
        "does to overhead_ratio",
    )
    ap.add_argument("--start", type=int, default=DEFAULT_START, help="offset into the held-out seed range")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--k", type=int, default=None, help="regions (default: auto)")
    ap.add_argument("--no-occlusion", action="store_true", help="skip the occlusion timing")
    ap.add_argument("--json", action="store_true", help="print only the summary JSON (as the last line)")
    scale = ap.add_argument_group("real scale: speed and peak memory against trace length (vstream.attr.scale)")
    scale.add_argument(
        "--random-init",
        default=None,
        metavar="NAME",
        help="a supported architecture at its published size with random weights: " + ", ".join(random_init_names()),
    )
    scale.add_argument("--reduced", action="store_true", help="with --random-init: its reduced size (a CPU)")
    scale.add_argument(
        "--lengths",
        type=int,
        nargs="+",
        default=None,
        help=f"generated-token trace lengths (default {' '.join(map(str, DEFAULT_LENGTHS))}); "
        "with --model, runs the scale table on that model",
    )
    scale.add_argument("--image-side", type=int, default=448, help="side of the square noise image (pixels)")
    scale.add_argument("--span-tokens", type=int, default=32, help="a span closes every this many tokens")
    scale.add_argument("--dtype", default="auto", help="auto (bf16 on a GPU, else float32), bfloat16, float32")
    add_load_options(ap)
    args = ap.parse_args(argv)
    if args.random_init or args.lengths:
        return _scale(args)
    if args.n < 1:
        ap.error("--n must be >= 1")
    if args.repeat < 1:
        ap.error("--repeat must be >= 1")
    try:
        vlm = load_from_args(args)
        if args.estimators:
            found = find_estimator(vlm, args.estimators, args.model)
            if found.estimator is None:
                raise VLMError(found.note)
            print(found.note, file=sys.stderr)
            est, est_name = found.estimator, str(found.path)
        else:
            est, est_name = load_estimator(args.estimator, vlm)
        res = bench(
            vlm,
            est,
            n=args.n,
            start=args.start,
            max_new_tokens=args.max_new_tokens,
            k=args.k,
            occlusion=not args.no_occlusion,
            repeat=args.repeat,
            process={"auto": None, "process": True, "thread": False}[args.worker],
            noise_floor=args.noise_floor,
        )
    except (VLMError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    res["estimator"] = est_name
    res["model"] = str(args.model)
    if not args.json:
        print(
            f"decode tokens/s: plain {res['tokens_per_s_plain']}, live {res['tokens_per_s_live']} "
            f"-> overhead_ratio {res['overhead_ratio']} (target >= 0.90)"
        )
        if args.repeat > 1:
            print(
                f"over {args.repeat} runs: overhead_ratio median {res['overhead_ratio_median']}, "
                f"min {res['overhead_ratio_min']} (at no visible cost: median >= 0.97, min >= 0.93)"
            )
        if args.noise_floor:
            print(
                f"plain against plain (noise floor): median {res['noise_floor_ratio_median']}, "
                f"min {res['noise_floor_ratio_min']}"
            )
        print(f"span latency ms: p50 {res['span_latency_ms_p50']}, p95 {res['span_latency_ms_p95']} (target p95 <= 50)")
        print(
            f"seconds per span: vSTREAM {res['vstream_s_per_span']}, occlusion {res['occlusion_s_per_span']} "
            f"-> speedup {res['speedup_vs_occlusion']} (target >= 100)"
        )
    print(json.dumps(res))
    return 0


def _scale(args: argparse.Namespace) -> int:
    """The real-scale table (`vstream.attr.scale`) on a random-weight architecture or a model."""
    try:
        if args.random_init:
            vlm = random_init_vlm(args.random_init, reduced=args.reduced, dtype=args.dtype)
            name = args.random_init + (" (reduced)" if args.reduced else "")
        else:
            vlm, name = load_from_args(args, dtype=args.dtype), str(args.model)
        res = bench_scale(
            vlm,
            tuple(args.lengths or DEFAULT_LENGTHS),
            image_side=args.image_side,
            span_tokens=args.span_tokens,
            k=args.k,
        )
    except (VLMError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    res["model"] = name
    if not args.json:
        print(f"{name}: {res['parameters'] / 1e9:.2f} B parameters on {res['device_name']} ({res['dtype']})")
        for r in res["rows"]:
            ixg = r["input_x_gradient"]
            ixg = ixg if isinstance(ixg, str) else f"{ixg['peak_mb']} MB"
            print(
                f"  T={r['trace_tokens']:5d}: decode {r['plain']['tokens_per_s']} tok/s plain, "
                f"ratio {r['overhead_ratio']}, span p95 {r['vstream']['span_latency_ms_p95']} ms, "
                f"peak MB plain {r['plain']['peak_mb']} / vstream {r['vstream']['peak_mb']} / ixg {ixg}"
            )
    print(json.dumps(res))
    return 0
