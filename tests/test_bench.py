"""`python -m vstream bench`: the JSON contract, on a tiny random model (seconds, not a timing test)."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from vstream.attr.bench import TARGETS, bench, mode_orders
from vstream.attr.estimator import LinearEstimator
from vstream.cli.bench import main
from vstream.model import load_vlm

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


def test_bench_repeat_reports_median_and_min(tiny_qwen2_5_vl_dir):
    vlm = load_vlm(str(tiny_qwen2_5_vl_dir), device="cpu")  # own copy: capture switches its attention
    est = LinearEstimator(vlm.num_layers, vlm.num_heads)
    out = bench(vlm, est, n=1, max_new_tokens=10, occlusion=False, progress=False, repeat=2)
    runs = out["overhead_ratio_runs"]
    assert out["repeat"] == 2 and len(runs) == 2 and all(x > 0 for x in runs)
    lo, mid = out["overhead_ratio_min"], out["overhead_ratio_median"]
    assert isinstance(lo, float) and isinstance(mid, float) and 0 < lo <= mid
    assert lo == min(runs) and mid == pytest.approx(float(np.median(runs)), abs=1e-4)
    assert out["worker"] == ["process"] and out["same_tokens"] is True
    # one run: median and min are the ratio itself
    one = bench(vlm, est, n=1, max_new_tokens=6, occlusion=False, progress=False, warmup=0)
    assert one["overhead_ratio_min"] == one["overhead_ratio_median"] == one["overhead_ratio"]


def test_bench_noise_floor_times_plain_against_plain(tiny_qwen2_5_vl_dir):
    vlm = load_vlm(str(tiny_qwen2_5_vl_dir), device="cpu")
    est = LinearEstimator(vlm.num_layers, vlm.num_heads)
    out = bench(vlm, est, n=2, max_new_tokens=8, occlusion=False, progress=False, repeat=2, noise_floor=True)
    runs = out["noise_floor_ratio_runs"]
    assert len(runs) == 2 and all(x > 0 for x in runs) and out["noise_floor_ratio_min"] == min(runs)
    assert out["noise_floor_ratio_median"] == pytest.approx(float(np.median(runs)), abs=1e-4)
    off = bench(vlm, est, n=1, max_new_tokens=6, occlusion=False, progress=False, warmup=0)
    assert off["noise_floor_ratio_runs"] == [] and off["noise_floor_ratio_min"] is None


def test_mode_orders_let_every_mode_follow_every_other_equally_often():
    for modes in (["plain", "live"], ["plain", "live", "again"]):
        orders = mode_orders(modes)
        assert sorted(orders) == sorted(set(orders)) and all(sorted(o) == sorted(modes) for o in orders)
        pairs = Counter((o[j], o[j + 1]) for o in orders for j in range(len(o) - 1))
        assert set(pairs) == {(a, b) for a in modes for b in modes if a != b}
        assert len(set(pairs.values())) == 1
        assert Counter(o[0] for o in orders) == Counter({m: len(orders) // len(modes) for m in modes})
