"""python -m vstream train-estimator"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vstream.attr import estimator
from vstream.attr.estimator import heldout_report, train
from vstream.model import VLMError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m vstream train-estimator", description=(estimator.__doc__ or "").splitlines()[0]
    )
    ap.add_argument("--labels", type=Path, nargs="+", default=[Path("runs/labels")], help="label folder(s)")
    ap.add_argument("--out", type=Path, default=Path("assets/estimator-demo.safetensors"))
    ap.add_argument("--eval", type=Path, nargs="*", default=[], help="held-out label folder(s) to report on")
    ap.add_argument("--epochs", type=int, default=200)
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--val-fraction", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-refit", action="store_true", help="keep the model trained without the validation share")
    ap.add_argument("--no-region-bias", action="store_true", help="region score = w . f only (no shared constant)")
    ap.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay on the scaled weights")
    ap.add_argument("--loss", choices=tuple(estimator.LOSSES), default="pearson")
    ap.add_argument(
        "--scaling", choices=tuple(estimator.SCALINGS), default="rms", help="feature scaling while training"
    )
    ap.add_argument(
        "--columns", default="all", help="feature columns used: all, layers=A-B, or top=N (chosen on these labels)"
    )
    ap.add_argument(
        "--balance-families",
        action="store_true",
        help="every scene family weighs the same in the loss (whatever its spans per scene)",
    )
    ap.add_argument(
        "--features",
        default=None,
        help="feature variant to train on (default: the labels' primary); one the labels hold or derive "
        "(rmean / log from a stored one), recorded in the estimator",
    )
    args = ap.parse_args(argv)
    try:
        est, report = train(
            args.labels,
            args.epochs,
            args.lr,
            args.val_fraction,
            args.seed,
            refit=not args.no_refit,
            region_bias=not args.no_region_bias,
            weight_decay=args.weight_decay,
            loss=args.loss,
            scaling=args.scaling,
            columns=args.columns,
            feature_variant=args.features,
            balance=args.balance_families,
        )
        if args.eval:
            report.update(heldout_report(est, args.eval))
        est.meta["report"] = {k: v for k, v in report.items() if k != "heldout"}
        est.save(args.out)
    except VLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    side = args.out.with_suffix(".json")
    side.write_text(json.dumps({"estimator": str(args.out), **report, "meta": est.meta}, indent=1))
    print(json.dumps(report))
    return 0
