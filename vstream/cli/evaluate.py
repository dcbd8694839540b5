"""python -m vstream evaluate"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vstream.attr import evaluate as evaluate_mod
from vstream.attr.estimator_lookup import find_estimator
from vstream.attr.evaluate import (
    ALL_METHODS,
    DEFAULT_ESTIMATOR,
    DEFAULT_START,
    N_MASKS,
    evaluate,
    load_estimator,
)
from vstream.attr.userdata import read_data
from vstream.cli.model_options import add_load_options, load_from_args
from vstream.model import VLMError
from vstream.world.assets import DEMO_MODEL_DIR
from vstream.world.eval_model import check_heldout


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m vstream evaluate", description=(evaluate_mod.__doc__ or "").splitlines()[0]
    )
    ap.add_argument("--model", default=str(DEMO_MODEL_DIR), help="model folder or Hugging Face id")
    ap.add_argument("--estimator", default=str(DEFAULT_ESTIMATOR), help="trained estimator (.safetensors)")
    ap.add_argument("--estimators", default=None, help="folder of estimators: use the one that fits the model")
    ap.add_argument("--data", default=None, help="your own rows (.jsonl, .csv or a datasets folder) instead of scenes")
    ap.add_argument("--n", type=int, default=None, help="held-out scenes (default 200) or rows of --data (default all)")
    ap.add_argument(
        "--start",
        type=int,
        default=None,
        help=f"offset into the split's seed range (held-out default {DEFAULT_START}, disjoint from eval-model; val 0)",
    )
    ap.add_argument(
        "--split",
        choices=("heldout", "val"),
        default="heldout",
        help="scene seeds: heldout (reporting) or val (choosing settings; --start defaults to 0 there)",
    )
    ap.add_argument(
        "--methods", default=",".join(ALL_METHODS), help="comma-separated subset of " + ",".join(ALL_METHODS)
    )
    ap.add_argument(
        "--slow-n",
        type=int,
        default=None,
        help="run the slow methods (input_x_gradient, occlusion, tam, attnlrp) on the first SLOW_N scenes only "
        "(default: all)",
    )
    ap.add_argument("--masks", type=int, default=N_MASKS, help="random region subsets per scene")
    ap.add_argument("--mask-seed", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=192)
    ap.add_argument("--json", action="store_true", help="print only the summary JSON (as the last line)")
    add_load_options(ap)
    args = ap.parse_args(argv)
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    try:
        data = read_data(args.data) if args.data else None
        if Path(args.model).is_dir() and data is None:
            check_heldout(Path(args.model), args.split)
        vlm = load_from_args(args)
        estimator = None
        if "vstream" in methods and args.estimators:
            found = find_estimator(vlm, args.estimators, args.model)
            if found.estimator is None:
                raise VLMError(found.note)
            print(found.note, file=sys.stderr)
            estimator, args.estimator = found.estimator, str(found.path)
        elif "vstream" in methods:
            if not Path(args.estimator).is_file():
                raise VLMError(f"estimator not found: {args.estimator} (train one, or pass --estimator)")
            estimator = load_estimator(args.estimator, vlm)
        start = args.start
        if start is None:
            start = DEFAULT_START if data is None and args.split == "heldout" else 0
        res = evaluate(
            vlm,
            estimator,
            n=args.n if (args.n is not None or data is not None) else 200,
            start=start,
            methods=methods,
            slow_n=args.slow_n,
            n_masks=args.masks,
            mask_seed=args.mask_seed,
            max_new_tokens=args.max_new_tokens,
            data=data,
            split=args.split,
        )
        if data is not None:
            res["n_bad_rows"] = len(data.skipped)
    except (VLMError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    res["model"], res["estimator"] = args.model, (args.estimator if "vstream" in methods else None)
    if not args.json:
        what = "rows" if data is not None else {"heldout": "held-out", "val": "validation"}[args.split] + " scenes"
        print(f"{'method':18s} {'LDS':>7s} {'R^2':>7s} {'top5':>7s} {'point':>7s} {'s/span':>9s} {'peak MB':>9s}")
        for m in methods:
            f = lambda v, w=7, p=3: f"{v:{w}.{p}f}" if v is not None else " " * (w - 1) + "-"  # noqa: E731
            print(
                f"{m:18s} {f(res['lds'][m])} {f(res['r2'][m])} {f(res['top5_drop'][m])} "
                f"{f(res['pointing'][m])} {f(res['seconds_per_span'][m], 9, 5)} "
                f"{f(res['peak_memory_mb_per_span'][m], 9, 1)}"
            )
        print(
            f"{res['n']} {what}, {res['n_spans']} spans "
            f"({res['n_spans_constant']} constant), "
            f"{res['n_pointing_spans']} pointing spans; chance pointing {res['pointing_chance']}"
        )
    print(json.dumps(res))
    return 0
