"""Labels (vstream.attr.labels) and the linear estimator (vstream.attr.estimator)."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vstream.attr import estimator as E
from vstream.attr import labels as LB
from vstream.model import VLMError, load_vlm, model_identity, model_name

# ----------------------------------------------------------------------------------------------
# labels


@pytest.fixture(scope="module")
def own_tiny(tiny_qwen2_5_vl_dir):
    """Own copy: collecting installs the capture attention on the model."""
    return load_vlm(str(tiny_qwen2_5_vl_dir), device="cpu")


def _is_safetensors(path: Path) -> bool:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return raw[8:9] == b"{" and json.loads(raw[8 : 8 + n]) is not None


def test_label_shards_round_trip_and_resume(own_tiny, tmp_path):
    vlm = own_tiny
    out = tmp_path / "labels"
    kw = dict(split="train", masks_per_example=4, max_new_tokens=10, out=out, shard_size=2, progress=False)
    new = LB.collect(vlm, 3, **kw)
    assert len(new) == 3  # a random model's text always yields one open "thought" span
    files = sorted(p.name for p in out.iterdir())
    assert files == [
        "labels-0000000.json",
        "labels-0000000.safetensors",
        "labels-0000002.json",
        "labels-0000002.safetensors",
    ]
    assert all(_is_safetensors(p) for p in out.glob("*.safetensors"))  # never pickle
    cfg, back = LB.load_labels(out)
    assert cfg["model"] == model_name(vlm) and cfg["num_layers"] == 2 and cfg["num_heads"] == 4
    assert [e.index for e in back] == [0, 1, 2]
    for a, b in zip(new, back):
        s, k, n = a.n_spans, a.k, vlm.num_layers * vlm.num_heads
        assert a.features.shape == (s, k, n) and a.features.dtype == torch.float32
        assert a.masks.shape == (4, k) and a.masks.dtype == torch.bool
        assert a.effects.shape == (4, s) and a.base.shape == (s,)
        for name in ("features", "masks", "effects", "base", "assignment", "tokens"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
        assert a.span_ranges == b.span_ranges and a.span_texts == b.span_texts and a.seed == b.seed
        # masks are reproducible from (seed, scene seed)
        assert torch.equal(a.masks, LB.draw_masks(k, 4, 0.5, 0, a.seed))

    # resume: nothing new for the same range, one new example when the range grows
    assert LB.collect(vlm, 3, **kw) == []
    more = LB.collect(vlm, 4, **kw)
    assert [e.index for e in more] == [3]
    assert len(LB.load_labels(out)[1]) == 4
    # a different setup in the same folder is refused
    with pytest.raises(VLMError, match="different setup"):
        LB.collect(vlm, 5, **{**kw, "masks_per_example": 6})


def test_collect_shards_across_processes(own_tiny, tmp_path):
    out = tmp_path / "l"
    kw = dict(masks_per_example=3, max_new_tokens=6, out=out, progress=False, num_processes=2)
    a = LB.collect(own_tiny, 3, process_index=0, **kw)
    b = LB.collect(own_tiny, 3, process_index=1, **kw)
    assert [e.index for e in a] == [0, 2] and [e.index for e in b] == [1]
    assert [e.index for e in LB.load_labels(out)[1]] == [0, 1, 2]


# ----------------------------------------------------------------------------------------------
# loss and metrics


def test_pearson_loss_sign_and_invariances():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(5, 32, generator=g)
    p = torch.randn(5, 32, generator=g)
    assert E.pearson_loss(t, t).item() == pytest.approx(-1.0, abs=1e-5)
    assert E.pearson_loss(-t, t).item() == pytest.approx(1.0, abs=1e-5)
    base = E.pearson_loss(p, t).item()
    assert -1 < base < 1
    assert E.pearson_loss(3.0 * p + 7.0, t).item() == pytest.approx(base, abs=1e-5)  # scale/shift of pred
    assert E.pearson_loss(p, 0.5 * t - 2.0).item() == pytest.approx(base, abs=1e-5)  # and of target
    # a span with constant effects is left out
    t2 = t.clone()
    t2[0] = 1.0
    assert E.pearson_loss(p, t2).item() == pytest.approx(E.pearson_loss(p[1:], t2[1:]).item(), abs=1e-6)


def test_lds():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 32))
    p = a + rng.normal(size=(6, 32))
    assert E.lds(a, a) == pytest.approx(1.0)
    assert E.lds(-a, a) == pytest.approx(-1.0)
    want = np.mean([spearmanr(p[i], a[i])[0] for i in range(6)])
    assert E.lds(p, a) == pytest.approx(want, abs=1e-12)
    a2 = a.copy()
    a2[0] = 3.0  # constant measured effects: left out
    score, per = E.lds(p, a2, return_per_span=True)
    assert np.isnan(per[0]) and score == pytest.approx(np.nanmean(per))
    assert E.lds(np.ones((1, 32)), a[:1]) == 0.0  # constant prediction scores 0


# ----------------------------------------------------------------------------------------------
# files


def _fake_vlm(name: str = "demo-model", layers: int = 2, heads: int = 3, arch: str = "qwen2_5_vl"):
    return SimpleNamespace(
        model=SimpleNamespace(name_or_path=name, config=SimpleNamespace()),
        arch=arch,
        num_layers=layers,
        num_heads=heads,
    )


def test_save_load_round_trip(tmp_path):
    est = E.LinearEstimator(
        2,
        3,
        {
            "model": "demo-model",
            "model_type": "qwen2_5_vl",
            "backbone": "pixels",
            "k_rule": "auto",
            "train_seeds": [[0, 10]],
        },
    )
    with torch.no_grad():
        est.weight.copy_(torch.arange(6.0) - 2)
        est.region_bias.fill_(-0.5)
        est.bias.fill_(0.25)
    path = est.save(tmp_path / "est.safetensors")
    assert _is_safetensors(path)
    back = E.load(path, _fake_vlm())
    assert torch.equal(back.weight, est.weight) and back.bias.item() == 0.25 and back.region_bias.item() == -0.5
    assert back.meta["model"] == "demo-model" and back.meta["train_seeds"] == [[0, 10]]
    f = torch.rand(7, 6)
    torch.testing.assert_close(back.predict(f), f @ est.weight.detach() - 0.5)
    m = torch.rand(4, 7) < 0.5
    torch.testing.assert_close(back.predict_subsets(f, m), m.float() @ (f @ est.weight.detach() - 0.5) + 0.25)
    with pytest.raises(VLMError, match="L\\*H"):
        back.predict(torch.rand(7, 5))


def test_load_refusals(tmp_path):
    est = E.LinearEstimator(2, 3, {"model": "demo-model", "model_type": "qwen2_5_vl"})
    path = est.save(tmp_path / "est.safetensors")
    with pytest.raises(VLMError, match="2 layers x 3 heads.*4 layers x 3 heads"):
        E.load(path, _fake_vlm(layers=4))
    with pytest.raises(VLMError, match="heads"):
        E.load(path, _fake_vlm(heads=6))
    with pytest.raises(VLMError, match="not for the loaded 'other-model'"):
        E.load(path, _fake_vlm(name="other-model"))
    assert E.load(path, _fake_vlm(name="other-model"), allow_model_mismatch=True).num_heads == 3
    with pytest.raises(VLMError, match="layers"):  # the override never skips the L/H check
        E.load(path, _fake_vlm(name="other-model", layers=3), allow_model_mismatch=True)
    # pickled files are refused without being read, whatever their name
    for name in ("est.pt", "est.bin"):
        p = tmp_path / name
        torch.save({"weight": torch.ones(6)}, p)
        with pytest.raises(VLMError, match="not a safetensors file"):
            E.load(p)
    disguised = tmp_path / "pickle.safetensors"
    torch.save({"weight": torch.ones(6)}, disguised)
    with pytest.raises(VLMError, match="safetensors"):
        E.load(disguised)
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"weight": torch.ones(6)}, str(other))
    with pytest.raises(VLMError, match="not a vSTREAM estimator"):
        E.load(other)
    with pytest.raises(VLMError, match="not found"):
        E.load(tmp_path / "missing.safetensors")


def test_check_against_real_model(tiny_qwen2_5_vl, tmp_path):
    vlm = tiny_qwen2_5_vl
    est = E.LinearEstimator(vlm.num_layers, vlm.num_heads, model_identity(vlm))
    assert E.load(est.save(tmp_path / "e.safetensors"), vlm).meta["model"] == model_name(vlm)


# ----------------------------------------------------------------------------------------------
# training


@pytest.mark.parametrize("c", [0.0, 0.5])
def test_training_recovers_a_linear_ground_truth(c, synthetic_labels):
    w_true = np.random.default_rng(0).normal(size=8)
    exs = synthetic_labels(300, w_true, c=c)
    est, rep = E.train(exs, epochs=60, lr=0.05, val_fraction=0.2, seed=0, progress=False, num_layers=2, num_heads=4)
    assert est.num_layers == 2 and est.num_heads == 4
    assert rep["val"]["lds"] > 0.9 and rep["train"]["lds"] > 0.9
    assert rep["val"]["lds"] > rep["val_raw_attention"]["lds"] + (0.1 if c == 0 else 0.02)
    cos = float(
        np.dot(est.weight.detach().numpy(), w_true)
        / np.linalg.norm(est.weight.detach().numpy())
        / np.linalg.norm(w_true)
    )
    assert cos > 0.95
    assert rep["val"]["r2"] > 0.8  # calibrated: predictions in the effects' units
    assert est.region_bias.item() == pytest.approx(c, abs=0.1)
    held = synthetic_labels(50, -w_true, seed=1)  # other features, other w: runs, scores whatever it scores
    assert np.isfinite(E.evaluate(est, held)["lds"])


@pytest.mark.slow
def test_cli_collect_and_train(tiny_qwen2_5_vl_dir, tmp_path, capsys):
    from vstream.__main__ import main

    out = tmp_path / "labels"
    rc = main(
        [
            "collect",
            "--model",
            str(tiny_qwen2_5_vl_dir),
            "--n",
            "2",
            "--masks",
            "4",
            "--max-new-tokens",
            "6",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["examples"] == 2
    est_path = tmp_path / "est.safetensors"
    rc = main(["train-estimator", "--labels", str(out), "--out", str(est_path), "--epochs", "2", "--val-fraction", "0"])
    assert rc == 0
    est = E.load(est_path)
    assert est.meta["trained_examples"] == 2 and est.meta["num_heads"] == 4
    assert est.meta["k_rule"].startswith("auto") and est.meta["backbone"] == "pixels"
    assert est_path.with_suffix(".json").is_file()


def test_shipped_estimator(tiny_qwen2_5_vl):
    """The shipped demo estimator reads the demo model and refuses another model's layout."""
    from vstream.world.assets import DEMO_MODEL_DIR

    path = Path(__file__).resolve().parents[1] / "assets" / "estimator-demo.safetensors"
    if not path.is_file() or not (DEMO_MODEL_DIR / "model.safetensors").is_file():
        pytest.skip("demo model or its estimator not built yet")
    est = E.load(path)
    assert (est.num_layers, est.num_heads) == (4, 6) and est.meta["model"] == "demo-model"
    assert est.meta["trained_examples"] == 2000 and est.meta["masks_per_example"] == 32
    assert est.meta["k_rule"].startswith("auto") and est.meta["backbone"] == "pixels"
    assert est.meta["feature_variant"] == "vonorm+raw" and est.meta["family_balance"] is True
    demo = SimpleNamespace(
        model=SimpleNamespace(name_or_path=str(DEMO_MODEL_DIR), config=SimpleNamespace()),
        arch="qwen2_5_vl",
        num_layers=4,
        num_heads=6,
    )
    assert E.load(path, demo).num_features == 2 * 24  # value-weighted and plain, side by side
    with pytest.raises(VLMError, match="4 layers x 6 heads.*2 layers x 4 heads") as info:
        E.load(path, tiny_qwen2_5_vl)
    assert "\n" not in str(info.value)


def test_shipped_mean_estimator_is_what_watching_uses():
    """Watching computes the paper's mean features only, so the Video tab and `tays` commands fall
    back to the mean-feature still-image estimator, never to the shipped vonorm+raw one."""
    from tays.watch import StreamAttributor
    from ui.video import video_estimator
    from vstream.attr.features import variant_of
    from vstream.world.assets import DEMO_ESTIMATOR, DEMO_ESTIMATOR_MEAN, TAYS_MODEL_DIR, VIDEO_ESTIMATOR

    if not DEMO_ESTIMATOR_MEAN.is_file() or not (TAYS_MODEL_DIR / "model.safetensors").is_file():
        pytest.skip("TaYS model or the mean-feature estimator not built yet")
    est = E.load(DEMO_ESTIMATOR_MEAN)
    assert variant_of(est).is_default and est.meta["trained_examples"] == 2000
    vlm = load_vlm(str(TAYS_MODEL_DIR))
    chosen, line = video_estimator(vlm)
    want = VIDEO_ESTIMATOR if VIDEO_ESTIMATOR.is_file() else DEMO_ESTIMATOR_MEAN
    assert chosen is not None and want.name in line
    StreamAttributor(estimator=chosen)  # accepted: its predictor is built here
    with pytest.raises(VLMError, match="feature variant 'vonorm\\+raw'"):
        StreamAttributor(estimator=E.load(DEMO_ESTIMATOR))
