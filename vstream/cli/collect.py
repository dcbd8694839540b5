"""python -m vstream collect"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator

from vstream.attr import labels
from vstream.attr.labels import collect, load_labels
from vstream.attr.userdata import read_data
from vstream.cli.model_options import add_load_options, load_from_args
from vstream.model import VLMError
from vstream.world.assets import DEMO_MODEL_DIR


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vstream collect", description=(labels.__doc__ or "").splitlines()[0])
    ap.add_argument("--model", default=str(DEMO_MODEL_DIR), help="model folder or hub id (default: the demo model)")
    ap.add_argument("--data", default=None, help="your own rows: .jsonl, .csv or a datasets folder")
    ap.add_argument("--n", type=int, default=None, help="number of scenes (default 2000) or rows (default all)")
    ap.add_argument("--start", type=int, default=0, help="offset of the first scene in the split (or row in --data)")
    ap.add_argument(
        "--split",
        choices=("train", "val", "heldout"),
        default="train",
        help="scene seeds: train, val (for choosing settings, e.g. estimator-variants) or heldout (reporting)",
    )
    ap.add_argument("--out", type=Path, default=Path("runs/labels"))
    ap.add_argument("--masks", type=int, default=32, help="random region masks per example")
    ap.add_argument("--keep-prob", type=float, default=0.5)
    ap.add_argument("--k", type=int, default=None, help="regions per image (default: auto)")
    ap.add_argument(
        "--backbone",
        default=None,
        help="region backbone: pixels (default), a DINOv3 id/path, or the content-free baselines blocks / voronoi",
    )
    ap.add_argument("--seed", type=int, default=0, help="mask seed (combined with each scene's seed)")
    ap.add_argument(
        "--features",
        default="mean",
        help="comma-separated feature variants to store, the first one primary (default: mean, the paper's); "
        "tokens joined by +: vnorm|vonorm, tnorm, mean|max|last, rmean, log (see vstream/attr/features.py)",
    )
    ap.add_argument("--max-new-tokens", type=int, default=192)
    ap.add_argument("--shard-size", type=int, default=25, help="examples per shard file")
    ap.add_argument("--dtype", default="auto")
    add_load_options(ap)
    args = ap.parse_args(argv)

    acc = Accelerator(cpu=not torch.cuda.is_available())
    try:
        data = read_data(args.data) if args.data else None
        vlm = load_from_args(args, dtype=args.dtype, device=acc.device if args.device_map is None else "auto")
        t0 = time.perf_counter()
        new = collect(
            vlm,
            args.n if (args.n is not None or data is not None) else 2000,
            args.split,
            args.start,
            args.masks,
            args.keep_prob,
            args.k,
            args.backbone,
            args.seed,
            args.max_new_tokens,
            out=args.out,
            process_index=acc.process_index,
            num_processes=acc.num_processes,
            shard_size=args.shard_size,
            progress=acc.is_local_main_process,
            data=data,
            feature_variants=[v.strip() for v in args.features.split(",") if v.strip()],
        )
        dt = time.perf_counter() - t0
    except VLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    acc.wait_for_everyone()
    mine = {
        "process": acc.process_index,
        "new_examples": len(new),
        "seconds": round(dt, 1),
        "s_per_example": round(dt / len(new), 3) if new else None,
    }
    print(json.dumps(mine), file=sys.stderr)
    if acc.is_main_process:
        _, exs = load_labels(args.out)
        print(
            json.dumps(
                {
                    "out": str(args.out),
                    "examples": len(exs),
                    "spans": sum(e.n_spans for e in exs),
                    **(
                        {"data": str(data.path), "data_format": data.kind, "bad_rows": len(data.skipped)}
                        if data is not None
                        else {}
                    ),
                    "processes": acc.num_processes,
                    "this_process": mine,
                }
            )
        )
    return 0
