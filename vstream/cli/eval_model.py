"""python -m vstream eval-model"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vstream.attr.answers import evaluate_answers
from vstream.attr.userdata import read_data
from vstream.cli.model_options import add_load_options, load_from_args
from vstream.model import VLMError
from vstream.world import eval_model
from vstream.world.assets import DEMO_MODEL_DIR
from vstream.world.eval_model import check_heldout, evaluate


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m vstream eval-model", description=(eval_model.__doc__ or "").splitlines()[0]
    )
    ap.add_argument("--model", default=str(DEMO_MODEL_DIR), help="model folder or Hugging Face id")
    ap.add_argument("--data", default=None, help="your own rows (.jsonl, .csv or a datasets folder) instead of scenes")
    ap.add_argument("--out", type=Path, default=None, help="with --data: per-row JSONL, resumed when it exists")
    ap.add_argument("--max-new-tokens", type=int, default=512, help="with --data: tokens per answer")
    ap.add_argument(
        "--n", type=int, default=None, help="scenes of --split (default 600; families cycle) or rows of --data"
    )
    ap.add_argument("--start", type=int, default=0, help="offset into the split's seed range (or the rows)")
    ap.add_argument(
        "--split",
        choices=("heldout", "val"),
        default="heldout",
        help="held-out scenes for reporting; validation scenes for choosing a recipe",
    )
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--json", action="store_true", help="print only the summary JSON as the last line")
    add_load_options(ap)
    args = ap.parse_args(argv)
    try:
        if args.data:
            data = read_data(args.data)
            vlm = load_from_args(args)
            res = evaluate_answers(vlm, data, args.n, args.start, args.max_new_tokens, args.out)
            print(json.dumps(res))
            return 0
        if Path(args.model).is_dir():
            check_heldout(Path(args.model), args.split)
        vlm = load_from_args(args)
        n = 600 if args.n is None else args.n
        res = evaluate(vlm, n, args.start, args.batch_size, progress=True, split=args.split)
    except (VLMError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not args.json:
        for ex in res["failed_examples"]:
            print(f"[{ex['seed']}] {ex['question']}\n  truth:  {ex['truth']}\n  output: {ex['output']}")
        print(f"accuracy {res['accuracy']:.3f} on {res['n']} {args.split} scenes")
        for f, a in res["per_family"].items():
            print(f"  {f:10s} {a:.3f}")
    print(json.dumps(res))
    return 0
