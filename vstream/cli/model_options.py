"""Options every command that loads a model shares: how a big model is placed and stored."""

from __future__ import annotations

import argparse

from vstream.model import VLM, load_vlm


def add_load_options(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("big models")
    g.add_argument("--device-map", default=None, help='"auto": spread the layers over every GPU (accelerate)')
    g.add_argument("--load-in", choices=("4bit", "8bit"), default=None, help="quantise with bitsandbytes (a GPU)")


def load_from_args(args: argparse.Namespace, **kw) -> VLM:
    """`load_vlm(args.model, ...)` with the big-model options; `kw` adds dtype, device, ..."""
    return load_vlm(args.model, device_map=args.device_map, load_in=args.load_in, **kw)
