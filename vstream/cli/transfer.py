"""python -m vstream transfer"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vstream.attr import transfer
from vstream.attr.labels import load_labels
from vstream.model import VLMError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m vstream transfer",
        description="Cross-family transfer matrix, LDS against training-set size and region methods "
        "compared on one labels budget; estimators fitted on training labels, scored on held-out labels.",
    )
    ap.add_argument("--labels", type=Path, nargs="+", default=[Path("runs/labels")], help="training label folder(s)")
    ap.add_argument("--heldout", type=Path, nargs="+", default=[Path("runs/labels-heldout")])
    ap.add_argument(
        "--regions",
        nargs="*",
        default=[],
        metavar="NAME=TRAIN_DIR,HELDOUT_DIR",
        help="label folders collected with other regions (e.g. blocks=runs/labels-blocks,runs/labels-blocks-heldout); "
        "the main --labels/--heldout are the semantic regions",
    )
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--sizes", default=",".join(map(str, transfer.SIZES)))
    ap.add_argument("--json", action="store_true", help="print only the JSON")
    args = ap.parse_args(argv)
    try:
        cfg, train_ex = load_labels(args.labels)
        held_cfg, held_ex = load_labels(args.heldout)
        if cfg.get("model") != held_cfg.get("model"):
            raise VLMError(f"training labels come from {cfg.get('model')!r}, held-out from {held_cfg.get('model')!r}")
        shared = {e.seed for e in train_ex} & {e.seed for e in held_ex}
        if shared:
            raise VLMError(f"training and held-out labels share {len(shared)} scene seeds")
        sets = {cfg.get("backbone", "semantic"): (train_ex, held_ex)}
        for spec in args.regions:
            name, _, dirs = spec.partition("=")
            tr_dir, _, held_dir = dirs.partition(",")
            if not (name and tr_dir and held_dir):
                raise VLMError(f"--regions wants NAME=TRAIN_DIR,HELDOUT_DIR, got {spec!r}")
            sets[name] = (load_labels(tr_dir)[1], load_labels(held_dir)[1])
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
        res = {
            "model": cfg.get("model"),
            "families": transfer.family_matrix(train_ex, held_ex, args.epochs),
            "size_curve": transfer.size_curve(train_ex, held_ex, sizes, args.epochs),
            "region_methods": transfer.region_methods(sets, args.epochs) if len(sets) > 1 else None,
        }
    except (VLMError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not args.json:
        m = res["families"]["lds"]
        fams = [f for f in m["mixture"] if f != "all"]
        print("train \\ eval".ljust(16) + "".join(f"{g[:10]:>11s}" for g in fams))
        for f, row in m.items():
            print(f[:15].ljust(16) + "".join(f"{row[g]:11.3f}" if row[g] is not None else " " * 10 + "-" for g in fams))
        print("size curve:", res["size_curve"]["lds"])
    print(json.dumps(res))
    return 0
