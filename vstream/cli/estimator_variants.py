"""python -m vstream estimator-variants"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vstream.attr import variant_study
from vstream.attr.features import TOKENS
from vstream.attr.variant_study import TRAINING_TOKENS, markdown, run_study
from vstream.model import VLMError

EPILOG = f"""\
variants: "+"-joined tokens, e.g. base, vnorm, max+huber, log+wd1e-2, @masks64
  feature tokens: {", ".join(TOKENS)}
    (the labels must hold the pooled part: collect --features; rmean / log are derived)
  training tokens: {", ".join(TRAINING_TOKENS)}
default: base, every feature variant both label folders hold, rmean, log, rmean+log, every
training token once, every --train-set.

The whole study, once a model and its labels exist (validation scenes only; held-out labels
are refused):
  python -m vstream collect --n 2000 --features mean,vnorm,vonorm,tnorm,max,last,tnorm+max \\
      --out runs/labels-variants
  python -m vstream collect --split val --n 200 --features mean,vnorm,vonorm,tnorm,max,last,tnorm+max \\
      --out runs/labels-val-variants
  python -m vstream collect --n 2000 --masks 64 --out runs/labels-masks64       # label design
  python -m vstream estimator-variants --train runs/labels-variants --val runs/labels-val-variants \\
      --train-set masks64 runs/labels-masks64 --save runs/estimator-variants
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m vstream estimator-variants",
        description=(variant_study.__doc__ or "").splitlines()[0],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--train", type=Path, nargs="+", required=True, help="training label folder(s)")
    ap.add_argument("--val", type=Path, nargs="+", required=True, help="validation label folder(s): --split val")
    ap.add_argument(
        "--train-set",
        nargs=2,
        action="append",
        default=[],
        metavar=("NAME", "DIR"),
        help="another training label folder, used by variants with the token @NAME (repeatable)",
    )
    ap.add_argument("--variants", default=None, help="comma-separated variant names (default: see below)")
    ap.add_argument("--epochs", type=int, default=200)
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--val-fraction", type=float, default=0.1, help="share of the training labels that picks the epoch")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save", type=Path, default=None, help="save every variant's estimator in this folder")
    ap.add_argument("--json", action="store_true", help="print only the report JSON (as the last line)")
    args = ap.parse_args(argv)
    sets: dict[str, list[Path]] = {}
    for name, folder in args.train_set:
        sets.setdefault(name, []).append(Path(folder))
    variants = [v.strip() for v in args.variants.split(",") if v.strip()] if args.variants else None
    try:
        report = run_study(
            args.train,
            args.val,
            variants,
            sets,
            epochs=args.epochs,
            lr=args.lr,
            val_fraction=args.val_fraction,
            seed=args.seed,
            save_dir=args.save,
        )
    except VLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not args.json:
        print(markdown(report))
    print(json.dumps(report))
    return 0
