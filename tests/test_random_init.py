"""Real scale without weights: the full-size configs, the reduced builds, the scale benchmark."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from vstream.attr.scale import bench_scale
from vstream.cli import bench as bench_cli
from vstream.model import VLMError
from vstream.model.random_init import parameter_count, random_init_names, random_init_vlm, read_spec

NAMES = ["glm-4.1v-9b", "qwen2.5-vl-3b", "qwen2.5-vl-7b", "qwen3-vl-8b"]


def test_every_published_config_is_there():
    assert random_init_names() == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_full_size_parameter_count_matches_the_release(name):
    """Built on the meta device (nothing allocated): the count must be the released model's."""
    want = read_spec(name)["published_params"]
    assert parameter_count(name) == pytest.approx(want, rel=0.001)


@pytest.mark.parametrize("name", NAMES)
def test_reduced_build_generates_to_the_requested_length(name):
    vlm = random_init_vlm(name, reduced=True, device="cpu")
    spec = read_spec(name)
    assert vlm.arch == spec["model_type"] and vlm.num_layers == spec["reduced"]["text_config"]["num_hidden_layers"]
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (100, 120, 3), dtype=np.uint8))
    inputs = vlm.build_inputs("What is in the image?", image=image)
    assert inputs.image_token_positions.numel() > 0
    ids = [t for t, _ in vlm.stream(inputs, max_new_tokens=9)]
    assert len(ids) == 9  # end-of-turn rows silenced
    assert vlm.image_token_id not in ids and vlm.video_token_id not in ids  # teacher-forceable


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(VLMError, match="qwen2.5-vl-7b"):
        random_init_vlm("llava-13b", reduced=True)


def test_scale_rows_per_length():
    vlm = random_init_vlm("glm-4.1v-9b", reduced=True, device="cpu")
    res = bench_scale(vlm, lengths=(8, 16), image_side=56, span_tokens=4, progress=False)
    assert [r["trace_tokens"] for r in res["rows"]] == [8, 16]
    for r in res["rows"]:
        assert r["plain"]["tokens"] == r["vstream"]["tokens"] == r["trace_tokens"]
        assert r["vstream"]["spans"] == r["trace_tokens"] // 4 and r["overhead_ratio"] > 0
        assert r["vstream"]["span_latency_ms_p95"] >= r["vstream"]["span_latency_ms_p50"] >= 0
        for method in ("plain", "vstream"):
            assert r[method]["peak_mb"] >= 0
        if isinstance(r["occlusion"], dict):
            assert r["occlusion"]["s_per_span"] > 0 and r["speedup_vs_occlusion"] > 0
        assert r["input_x_gradient"]["s_per_span"] > 0
    assert (
        res["device"] == "cpu" and res["model_type"] == "glm4v" and res["input_x_gradient_out_of_memory_from"] is None
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_bench_command_random_init_reduced(name, capsys):
    argv = ["--random-init", name, "--reduced", "--lengths", "8", "16", "--image-side", "56", "--span-tokens", "4"]
    assert bench_cli.main(argv + ["--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["model"] == f"{name} (reduced)" and len(res["rows"]) == 2
    assert bench_cli.main(["--random-init", "nope", "--reduced"]) == 2
    assert "no random-init config 'nope'" in capsys.readouterr().err
