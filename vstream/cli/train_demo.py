"""python -m vstream train-demo"""

from __future__ import annotations

import argparse
from pathlib import Path

from vstream.world import train_demo
from vstream.world.assets import DEMO_MODEL_DIR


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m vstream train-demo", description=(train_demo.__doc__ or "").splitlines()[0]
    )
    ap.add_argument("--steps", type=int, default=2000, help="optimizer steps (the LR schedule spans these)")
    ap.add_argument("--minutes", type=float, default=None, help="stop early after this much wall time")
    ap.add_argument("--batch-size", type=int, default=32, help="per process")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--out", type=Path, default=DEMO_MODEL_DIR, help="where the final model is saved")
    ap.add_argument("--run-dir", type=Path, default=Path("runs/demo"), help="checkpoints for resuming")
    ap.add_argument("--save-every", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--workers",
        type=int,
        default=0,
        help="data-loader processes per training process "
        "(0: render scenes in the training process; use a few on a GPU, where rendering is the bottleneck)",
    )
    ap.add_argument("--probe-weight", type=float, default=1.0, help="weight of the vision-token probe loss")
    ap.add_argument(
        "--position-probe",
        action="store_true",
        help="also probe each vision token's grid row and column",
    )
    ap.add_argument(
        "--init",
        type=Path,
        default=None,
        help="start from this model folder's weights (token embeddings matched by token text); "
        "the shipped model is fine-tuned from the previous one this way",
    )
    args = ap.parse_args(argv)
    train_demo.train(
        args.steps,
        args.minutes,
        args.batch_size,
        args.lr,
        args.out,
        args.run_dir,
        args.save_every,
        args.seed,
        args.workers,
        args.probe_weight,
        args.position_probe,
        args.init,
    )
    return 0
