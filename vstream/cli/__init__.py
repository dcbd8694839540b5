"""Command line: `python -m vstream <command> [options]`, one module per command.

Argument parsing and printing live here only; each command calls library functions.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train-demo": ("train_demo", "train the demo thinking model on the shapes world"),
    "eval-model": ("eval_model", "evaluate a model on held-out shapes-world scenes"),
    "render-examples": ("render_examples", "render shapes-world samples to examples/"),
    "bench": ("bench", "live attribution: decode overhead, span latency, speed vs occlusion"),
    "collect": ("collect", "collect estimator labels: span features + region-ablation effects"),
    "train-estimator": ("train_estimator", "train the linear vSTREAM estimator on collected labels"),
    "estimator-variants": ("estimator_variants", "feature / label / training variants of the estimator, on validation"),
    "evaluate": ("evaluate", "faithfulness of vSTREAM vs baselines (LDS, R^2, top-5 drop, pointing)"),
    "analyze": ("analyze", "reasoning dynamics: path shape and failure prediction on held-out traces"),
    "transfer": ("transfer", "estimator transfer across families, LDS vs labels, region methods"),
}


def main(argv: list[str] | None = None) -> int:
    """Dispatch to the command's module (imported on demand: `--help` stays fast)."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: python -m vstream <command> [options]\n\ncommands:")
        for name, (_, help_) in COMMANDS.items():
            print(f"  {name:16s} {help_}")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(f"vstream.cli.{COMMANDS[argv[0]][0]}")
    return module.main(argv[1:]) or 0
