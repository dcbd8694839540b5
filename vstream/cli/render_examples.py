"""python -m vstream render-examples"""

from __future__ import annotations

import argparse
from pathlib import Path

from vstream.world.assets import EXAMPLES_DIR
from vstream.world.examples import render_examples


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m vstream render-examples",
        description="Render shapes-world samples (PNG scenes, MP4 streams) into examples/ for the gallery.",
    )
    ap.add_argument("--out", type=Path, default=EXAMPLES_DIR)
    ap.add_argument("--per-family", type=int, default=3)
    ap.add_argument("--streams", type=int, default=2)
    args = ap.parse_args(argv)
    idx = render_examples(args.out, args.per_family, args.streams)
    print(f"wrote {len(idx['scenes'])} scenes and {len(idx['streams'])} streams to {args.out}")
    return 0
