"""Reasoning-dynamics analysis: features of trace prefixes, the risk model, the report's statistics."""

import json

import numpy as np
import pytest

from vstream.attr import analysis
from vstream.attr.analysis import TraceDynamics, analyze, fit_risk_model, prefix_features
from vstream.attr.analysis_plots import write_plots
from vstream.attr.risk import FEATURES, RiskModel
from vstream.model import VLMError


def _trace(rng, seed, correct, family="chain", n=10, k=16):
    """A steady trace re-uses one region; a failing one jumps between random regions."""
    scores = rng.random((n, k)) * 0.05
    if correct:
        scores[:, 3] += 1.0
    else:
        scores[np.arange(n), rng.integers(0, k, n)] += 1.0
    answer = "red"
    return TraceDynamics(seed, family, "", "q", answer, answer if correct else "blue", scores)


def _traces(seed, n=80, families=("chain", "sum_boxes")):
    rng = np.random.default_rng(seed)
    return [_trace(rng, i, i % 2 == 0, families[i % 4 // 2]) for i in range(n)]


def test_prefix_features_only_see_the_prefix():
    rng = np.random.default_rng(0)
    t = _trace(rng, 0, False)
    early = prefix_features(t.scores, 0.3)
    t.scores[4:] = 0.0  # what happens after 30% must not change the 30% features
    assert prefix_features(t.scores, 0.3) == early
    assert set(early) == set(FEATURES)
    steady = prefix_features(_trace(rng, 1, True).scores, 1.0)
    assert steady["switch_rate"] == 0.0 and early["switch_rate"] >= 0.5


def test_analyze_separates_steady_from_wandering_traces():
    res, risk = analyze(_traces(1), _traces(2), n_boot=100)
    assert res["n_correct"] == res["n_failed"] == 40
    lo, hi = res["auc_classifier_ci"]["0.3"]
    assert res["auc_classifier"]["0.3"] > 0.9 and lo <= res["auc_classifier"]["0.3"] <= hi
    assert res["p_value"]["path_length"]["p_value"] < 1e-4
    table = res["label_vs_failure"]
    assert sum(v for row in table.values() for v in row.values()) == 80
    assert table["Fixation"]["correct"] == 40  # one region all along
    assert sum(table[lab]["reasoning"] for lab in table) == 40  # every failure is a reasoning error here
    assert res["auc_within_family"]["1.0"] is not None
    assert len(res["traces"]) == 80 and {"path_length", "tortuosity", "label"} <= set(res["traces"][0])


def test_short_traces_are_left_out_of_timing():
    rng = np.random.default_rng(3)
    short = [_trace(rng, i, i % 2 == 0, "attribute", n=2) for i in range(20)]
    res, _ = analyze(_traces(4) + short, _traces(5), n_boot=50)
    assert res["n"] == 100 and res["n_timed"] == 80


def test_risk_model_round_trips_as_json(tmp_path):
    risk = fit_risk_model(_traces(6))
    path = tmp_path / "risk.json"
    risk.save(path)
    again = RiskModel.load(path)
    x = analysis.feature_matrix(_traces(7), 0.5)
    assert np.allclose(risk.probability(x), again.probability(x))
    assert json.loads(path.read_text())["features"] == list(FEATURES)
    path.write_text("{not json")
    with pytest.raises(VLMError, match="cannot read the risk model"):
        RiskModel.load(path)


def test_risk_model_needs_both_outcomes():
    rng = np.random.default_rng(8)
    with pytest.raises(VLMError, match="both correct and failed"):
        fit_risk_model([_trace(rng, i, True) for i in range(10)])


def test_plots_are_written(tmp_path):
    res, _ = analyze(_traces(9), _traces(10), n_boot=20)
    files = write_plots(res, tmp_path)
    assert {f.name for f in files} >= {"auc_by_elapsed.png", "auc_by_elapsed.html", "path_shape.png"}
    assert all(f.stat().st_size > 1000 for f in files)


def test_rank_auc_equals_scikit_learn():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(11)
    y = rng.random(200) < 0.3
    s = np.round(rng.random(200) + 0.3 * y, 1)  # with ties
    assert analysis.rank_auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


@pytest.mark.slow
def test_analyze_on_a_users_rows(tmp_path):
    """`analyze --data`: the user's rows (a third fit the risk model, the rest are analysed); a row
    whose image is missing is skipped and counted, not fatal."""
    import subprocess
    import sys

    from vstream.world.assets import DEMO_ESTIMATOR, DEMO_MODEL_DIR, EXAMPLES_DIR, ROOT

    index = json.loads((EXAMPLES_DIR / "index.json").read_text())["scenes"]
    rows = []
    # families every shipped demo model answers well; half the rows get a wrong reference answer,
    # so both outcomes occur in the fitting third and in the rest whatever the model writes
    for i, s in enumerate([s for s in index if s["family"] in ("attribute", "reading", "chart", "counting")][:12]):
        answer = s["answer"] if i % 2 else "certainly not this"
        rows.append({"image": str(EXAMPLES_DIR / s["file"]), "question": s["question"], "answer": answer})
    rows.append({"image": "missing.png", "question": "What is here?", "answer": "x"})
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    out = subprocess.run(
        [sys.executable, "-m", "vstream", "analyze", "--json", "--data", str(data), "--boot", "20"]
        + ["--model", str(DEMO_MODEL_DIR), "--estimator", str(DEMO_ESTIMATOR), "--out", str(tmp_path / "rep")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    skipped = res["skipped_short_traces"]
    assert res["n"] + res["n_fit"] + skipped["heldout"] + skipped["fit"] + res["n_bad_rows"] == 13
    assert res["n_failed"] >= 1 and (tmp_path / "rep" / "auc_by_elapsed.png").is_file()


def test_shipped_risk_model_is_what_the_reasoning_tab_shows():
    """The shipped risk model reads back, uses the live worker's features, carries its held-out
    AUC (with the trace count) and is what the page offers for the demo model."""
    import json

    from ui.explorer import risk_for
    from vstream.world.assets import DEMO_MODEL_DIR, RISK_MODEL

    risk = RiskModel.load(RISK_MODEL)
    assert tuple(json.loads(RISK_MODEL.read_text())["features"]) == FEATURES and len(risk.coef) == len(FEATURES)
    assert set(risk.heldout_auc) == {"0.3", "1.0", "n"} and risk.heldout_auc["n"] >= 300
    assert risk_for(str(DEMO_MODEL_DIR)) is not None
