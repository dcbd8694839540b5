"""Command line: python -m vstream <command> [options]."""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train-demo": ("vstream.world.train_demo", "train the demo thinking model on the shapes world"),
    "eval-model": ("vstream.world.eval_model", "evaluate a model on held-out shapes-world scenes"),
    "render-examples": ("vstream.world.examples", "render shapes-world samples to examples/"),
    "bench": ("vstream.attr.bench", "live attribution: decode overhead, span latency, speed vs occlusion"),
    "collect": ("vstream.attr.labels", "collect estimator labels: span features + region-ablation effects"),
    "train-estimator": ("vstream.attr.estimator", "train the linear vSTREAM estimator on collected labels"),
    "evaluate": ("vstream.attr.evaluate", "faithfulness of vSTREAM vs baselines (LDS, R^2, top-5 drop, pointing)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: python -m vstream <command> [options]\n\ncommands:")
        for name, (_, help_) in COMMANDS.items():
            print(f"  {name:16s} {help_}")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
