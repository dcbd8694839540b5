"""Runs you keep (vstream.attr.record, ui.report): the record `attribute_run` returns is the one
the page saves, reopens and reports; a file round-trips exactly; occlusion re-scores a span of a
reopened run; the HTML report is one offline page with the heatmaps and the 3-D path.

On the shipped demo model and estimator (whatever they are at the time: nothing here depends on
what the model answers).
"""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest

from vstream.attr.record import FORMAT, RunFileError, RunRecord, attribute_run, load_run, score_span
from vstream.world.assets import DEMO_ESTIMATOR, DEMO_MODEL_DIR, EXAMPLES_DIR

pytestmark = pytest.mark.skipif(not (DEMO_MODEL_DIR / "config.json").is_file(), reason="demo model not built")


def _example() -> tuple[str, str]:
    index = json.loads((EXAMPLES_DIR / "index.json").read_text())
    s = index["scenes"][0]
    return str(EXAMPLES_DIR / s["file"]), s["question"]


@pytest.fixture(scope="module")
def demo():
    from vstream import load_estimator, load_vlm
    from vstream.attr.estimator import RawAttention

    vlm = load_vlm(str(DEMO_MODEL_DIR))
    try:
        est = load_estimator(str(DEMO_ESTIMATOR), vlm)
    except Exception:  # noqa: BLE001 - a retrained model may not have its estimator yet
        est = RawAttention()
    return vlm, est


@pytest.fixture(scope="module")
def record(demo) -> RunRecord:
    vlm, est = demo
    path, q = _example()
    return attribute_run(vlm, path, q, est, model="assets/demo-model", max_new_tokens=64)


def test_attribute_run_returns_the_whole_record(record, demo):
    import vstream

    assert vstream.attribute_run is attribute_run and vstream.RunRecord is RunRecord  # the notebook names
    d = record.to_dict()
    assert d["format"] == FORMAT and d["done"] and d["question"] == _example()[1]
    assert d["model"] == "assets/demo-model" and d["model_identity"]["num_layers"] == demo[0].num_layers
    assert d["estimator"]["kind"] in ("linear", "raw_attention")
    assert d["k"] >= 2 and len(d["regions"]["token_labels"]) == record.regions.assignment.shape[1]
    assert d["spans"], "the demo model wrote no span"
    for s in d["spans"]:
        assert len(s["scores"]) == d["k"] and s["text"]
        assert {record.method, "raw_attention"} <= set(s["methods"])  # the compare view's methods, from the run
    assert {"total_s", "tokens_per_s", "n_tokens"} <= set(d["timings"])
    assert "".join(d["tokens"]) and len(d["token_ids"]) >= len(d["tokens"]) - 1
    assert len(d["path"]) == len(d["spans"])


def test_file_round_trip_is_exact(record, tmp_path):
    path = record.save(tmp_path / "run.json")
    again = load_run(path)
    assert again.to_dict() == record.to_dict()
    assert np.array_equal(again.pixel_labels(), record.pixel_labels())
    assert json.loads(path.read_text())["image"]["png_base64"]  # one self-contained JSON file


def test_live_risk_is_kept_in_the_file(record, tmp_path):
    d = json.loads(record.to_json())
    d["risk"] = [0.25, 0.5][: len(d["spans"])]
    again = RunRecord.from_dict(d)
    assert again.risk == d["risk"] and load_run(again.save(tmp_path / "r.json")).risk == d["risk"]


def test_occlusion_rescores_a_span_of_a_reopened_run(record, demo, tmp_path):
    again = load_run(record.save(tmp_path / "run.json"))
    out = score_span(demo[0], again, 0, "occlusion")
    assert out["scores"].shape == (again.k,) and np.isfinite(out["scores"]).all() and out["ms"] > 0
    assert "occlusion" in again.to_dict()["spans"][0]["methods"]  # kept with the run from now on
    assert RunRecord.from_dict(json.loads(again.to_json())).spans[0].methods["occlusion"]["ms"] == pytest.approx(
        out["ms"], abs=1e-3
    )


def test_report_is_one_offline_page(record):
    from ui.report import report_html

    page = report_html(record)
    assert page.startswith("<!DOCTYPE html>")
    pngs = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(pngs) == len(record.spans)
    assert base64.b64decode(pngs[0])[:8] == b"\x89PNG\r\n\x1a\n"
    assert "scatter3d" in page and "reliance-path" in page
    assert not re.search(r"<script[^>]+src=", page), "the report must not load scripts from anywhere"
    assert "plotly.js v" in page or "Plotly" in page  # plotly.js itself is inlined


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.update(format="other"),
        lambda d: d.update(version=99),
        lambda d: d["spans"][0].update(scores=[1.0]),
        lambda d: d["spans"][0].update(top_regions=[10**6]),
        lambda d: d["spans"][0].update(token_end=10**6),
        lambda d: d["regions"].update(labels=[[0, 1], [0]]),
        lambda d: d["regions"].update(token_labels=[0]),
        lambda d: d["image"].update(png_base64="!!!"),
        lambda d: d["image"].update(png_base64=base64.b64encode(b"GIF89a").decode()),
        lambda d: d.update(run_id="../../etc/passwd"),
        lambda d: d["spans"][0]["methods"].update(evil={"scores": [], "ms": 0}),
        lambda d: d.update(path=[[1, 2]]),
        lambda d: d.update(spans="x"),
        lambda d: d.update(risk=[2.0]),
        lambda d: d.update(risk="high"),
    ],
)
def test_malformed_files_give_one_line(record, mutate):
    d = json.loads(record.to_json())
    mutate(d)
    with pytest.raises(RunFileError) as err:
        RunRecord.from_dict(d)
    assert "\n" not in str(err.value)


def test_non_json_and_huge_files_are_refused(tmp_path):
    from vstream.attr.record import MAX_RUN_FILE_BYTES

    with pytest.raises(RunFileError, match="not JSON"):
        RunRecord.from_bytes(b"\x80\x04\x95 pickle")
    with pytest.raises(RunFileError, match="not JSON"):
        RunRecord.from_bytes(b'{"a": NaN}')
    big = tmp_path / "big.json"
    with open(big, "wb") as f:
        f.truncate(MAX_RUN_FILE_BYTES + 1)
    with pytest.raises(RunFileError, match="too large"):
        load_run(big)
