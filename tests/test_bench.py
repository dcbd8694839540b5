"""`python -m vstream bench`: the JSON contract, on a tiny random model (seconds, not a timing test)."""

from __future__ import annotations

import json

import pytest

from vstream.attr.bench import TARGETS
from vstream.cli.bench import main

pytestmark = pytest.mark.slow  # command-line tests


def test_bench_json_last_line(tiny_qwen2_5_vl_dir, capsys):
    rc = main(["--model", str(tiny_qwen2_5_vl_dir), "--n", "2", "--max-new-tokens", "12", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in TARGETS:
        assert isinstance(out[key], float) and out[key] > 0, key
    assert out["estimator"] == "random-stand-in"  # the demo estimator does not fit this model
    assert out["same_tokens"] is True and out["n_prompts"] == 2
    assert out["n_spans"] >= 1 and out["span_latency_ms_p50"] <= out["span_latency_ms_p95"]
    lo, mid, hi = out["overhead_ratio_paired_quartiles"]
    assert 0 < lo <= mid <= hi
    assert set(out["targets_met"]) == set(TARGETS)


def test_bench_refuses_a_missing_estimator(tiny_qwen2_5_vl_dir, capsys, tmp_path):
    rc = main(["--model", str(tiny_qwen2_5_vl_dir), "--n", "1", "--estimator", str(tmp_path / "nope.safetensors")])
    err = capsys.readouterr().err
    assert rc == 2 and "estimator file not found" in err and "Traceback" not in err
