"""python -m vstream analyze"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vstream.attr import analysis
from vstream.attr.analysis_plots import write_plots
from vstream.attr.estimator import load
from vstream.attr.userdata import read_data
from vstream.model import VLMError, load_vlm
from vstream.world.assets import DEMO_ESTIMATOR, DEMO_MODEL_DIR, RISK_MODEL
from vstream.world.eval_model import check_heldout
from vstream.world.shapes import FAMILIES, scenes

HELDOUT_START = 300_000  # disjoint from eval-model (0..), evaluate (100_000..), held-out labels (200_000..)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m vstream analyze",
        description="Reasoning dynamics on held-out traces: path shape of correct vs failed chains, "
        "failure prediction by elapsed reasoning, per-step fidelity, Fixation/Wandering vs failure type.",
    )
    ap.add_argument("--model", default=str(DEMO_MODEL_DIR))
    ap.add_argument("--estimator", default=str(DEMO_ESTIMATOR))
    ap.add_argument("--data", default=None, help="your own rows with answers (.jsonl, .csv or a datasets folder)")
    ap.add_argument("--n", type=int, default=1100, help="held-out scenes analysed (cycling the families)")
    ap.add_argument("--fit-n", type=int, default=550, help="validation scenes the risk classifier is fitted on")
    ap.add_argument("--families", default=",".join(FAMILIES), help="comma-separated families to keep")
    ap.add_argument("--fidelity", type=int, default=200, help="held-out traces that also get per-step R^2")
    ap.add_argument("--boot", type=int, default=1000, help="bootstrap resamples for the AUC intervals")
    ap.add_argument("--max-new-tokens", type=int, default=192)
    ap.add_argument("--out", type=Path, default=Path("runs/analysis"), help="report JSON and plots")
    ap.add_argument("--risk-out", type=Path, default=None, help=f"also save the risk model here (e.g. {RISK_MODEL})")
    ap.add_argument("--json", action="store_true", help="print only the summary JSON (as the last line)")
    args = ap.parse_args(argv)
    fams = [f.strip() for f in args.families.split(",") if f.strip()]
    try:
        if bad := [f for f in fams if f not in FAMILIES]:
            raise VLMError(f"unknown families {bad}; choose from {', '.join(FAMILIES)}")
        if Path(args.model).is_dir() and not args.data:
            check_heldout(Path(args.model))
            check_heldout(Path(args.model), "val")
        vlm = load_vlm(args.model)
        est = load(args.estimator, vlm)
        if args.data:  # the user's rows: every third one fits the risk model, the rest are analysed
            source = read_data(args.data)
            bad_rows = len(source.skipped) + sum(1 for r in source.rows if not r.answer)
            rows = [r for r in source.rows if r.answer]
            if len(rows) < 6:
                raise VLMError(f"{args.data}: analyze needs at least 6 rows with an answer, found {len(rows)}")
            fit_items, held_items = rows[::3], [r for i, r in enumerate(rows) if i % 3]
        else:
            bad_rows = 0
            pick = lambda split, start, n: [s for s in scenes(split, start, n) if s.family in fams]  # noqa: E731
            fit_items, held_items = pick("val", 0, args.fit_n), pick("heldout", HELDOUT_START, args.n)
        fit, skipped_fit = analysis.collect_dynamics(vlm, est, fit_items, args.max_new_tokens, desc="fit traces")
        held, skipped = analysis.collect_dynamics(
            vlm, est, held_items, args.max_new_tokens, args.fidelity, desc="held-out traces"
        )
        res, risk = analysis.analyze(held, fit, args.boot)
    except (VLMError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    res.update(
        model=args.model,
        estimator=args.estimator,
        heldout_start=None if args.data else HELDOUT_START,
        data=args.data,
        n_bad_rows=bad_rows,
        skipped_short_traces={"heldout": skipped, "fit": skipped_fit},
        risk_model=risk.to_json(),
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "analysis.json").write_text(json.dumps(res, indent=1))
    res["plots"] = [str(p) for p in write_plots(res, args.out)]
    if args.risk_out:
        risk.save(args.risk_out)
    summary = {k: v for k, v in res.items() if k != "traces"}
    if not args.json:
        print(f"{res['n_correct']} correct, {res['n_failed']} failed held-out traces")
        for f, auc in res["auc"].items():
            print(f"  {f} elapsed: AUC tortuosity {auc} {res['auc_ci'][f]}, classifier {res['auc_classifier'][f]}")
        print(f"report: {args.out / 'analysis.json'}")
    print(json.dumps(summary))
    return 0
