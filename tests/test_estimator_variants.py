"""Estimator training options (vstream.attr.estimator) and the variant study command
(vstream.attr.variant_study, `python -m vstream estimator-variants`) on tiny label sets."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from scipy.stats import spearmanr

from vstream.attr import estimator as E
from vstream.attr import labels as LB
from vstream.attr import variant_study as VS
from vstream.model import VLMError, load_vlm

# ----------------------------------------------------------------------------------------------
# training options on synthetic labels with a known linear truth


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


W_TRUE = np.random.default_rng(3).normal(size=8)
KW = dict(epochs=60, lr=0.05, val_fraction=0.2, seed=0, progress=False, num_layers=2, num_heads=4)


@pytest.mark.parametrize("loss", ["mse", "huber"])
def test_error_losses_recover_a_linear_truth(loss, synthetic_labels):
    est, rep = E.train(synthetic_labels(150, W_TRUE), loss=loss, weight_decay=0.0, **KW)
    assert rep["val"]["lds"] > 0.9 and _cos(est.weight.detach().numpy(), W_TRUE) > 0.95
    assert est.meta["loss_name"] == loss and est.meta["loss"] == E.LOSSES[loss] and est.meta["weight_decay"] == 0.0


def test_zscore_scaling_folds_the_centring_into_the_region_bias(synthetic_labels):
    est, rep = E.train(synthetic_labels(150, W_TRUE, c=0.5), scaling="zscore", **KW)
    assert rep["val"]["lds"] > 0.9 and _cos(est.weight.detach().numpy(), W_TRUE) > 0.95
    assert est.region_bias.item() == pytest.approx(0.5, abs=0.1)  # raw-feature space, as rms training
    with pytest.raises(VLMError, match="needs the region bias"):
        E.train(synthetic_labels(10, W_TRUE), scaling="zscore", region_bias=False, **KW)


def test_column_rules_keep_other_weights_at_zero(synthetic_labels):
    sparse = np.zeros(8)
    sparse[[2, 7]] = [1.5, -2.0]
    exs = synthetic_labels(200, sparse)
    est, _ = E.train(exs, columns="top=2", **KW)
    w = est.weight.detach().numpy()
    assert est.meta["kept_columns"] == [2, 7] and np.count_nonzero(w) == 2 and _cos(w, sparse) > 0.95
    est, _ = E.train(exs, columns="layers=1-1", **KW)
    w = est.weight.detach().numpy()
    assert np.all(w[:4] == 0) and np.all(w[4:] != 0) and est.meta["kept_columns"] == [4, 5, 6, 7]
    assert E.select_columns("layers=0", exs, 2, 4) == [0, 1, 2, 3] and E.select_columns("all", exs, 2, 4) is None
    for bad in ("layers=2", "top=0", "top=9", "heads=1", "layers=1-0"):
        with pytest.raises(VLMError, match="bad column rule"):
            E.train(exs, columns=bad, **KW)
    with pytest.raises(VLMError, match="unknown loss"):
        E.train(exs, loss="l1", **KW)


def test_anchor_keeps_the_map_near_raw_attention(synthetic_labels):
    """The anchor pulls the learned direction towards raw attention's (all ones, here where the
    synthetic features share one scale; the calibration may flip its sign, as it would raw
    attention's where that anti-correlates with the effects); 0 is
    plain training."""
    exs = synthetic_labels(150, W_TRUE)
    ones = np.ones(8)
    cos = {}
    for a in (0.0, 1.0, 100.0):
        est, _ = E.train(exs, anchor=a, **KW)
        cos[a] = abs(_cos(est.weight.detach().numpy(), ones))
        assert est.meta["anchor"] == a
    assert cos[0.0] < 0.5 and cos[1.0] > 0.95 and cos[100.0] > 0.95  # |cos(W_TRUE, 1)| = 0.28
    assert _cos(E.train(exs, **KW)[0].weight.detach().numpy(), W_TRUE) > 0.95
    for bad in (-1.0, float("nan")):
        with pytest.raises(VLMError, match="anchor"):
            E.train(exs, anchor=bad, **KW)


def test_family_balance_gives_a_rare_family_its_share(synthetic_labels):
    """Two scene families whose effects follow different maps, one with ten times the spans: the
    plain fit follows the common family; balanced, the rare one weighs as much, and its fresh
    spans are ranked better."""
    import dataclasses

    w_rare = np.random.default_rng(4).normal(size=8)

    def fam(n, w, name, seed):
        return [dataclasses.replace(e, family=name) for e in synthetic_labels(n, w, seed=seed)]

    train = fam(300, W_TRUE, "common", 0) + fam(30, w_rare, "rare", 1)
    fresh = fam(60, w_rare, "rare", 2)
    plain, _ = E.train(train, **KW)
    balanced, _ = E.train(train, balance=True, **KW)
    assert balanced.meta["family_balance"] and not plain.meta["family_balance"]
    assert E.evaluate(balanced, fresh)["lds"] > E.evaluate(plain, fresh)["lds"] + 0.05
    w = E.family_weights(train, [i for i, e in enumerate(train) for _ in range(e.n_spans)])
    common = [i for i, e in enumerate(train) for _ in range(e.n_spans) if e.family == "common"]
    assert float(w[common].sum()) == pytest.approx(1.0) and float(w.sum()) == pytest.approx(2.0)
    with pytest.raises(VLMError, match="Pearson"):
        E.train(train, balance=True, loss="mse", **KW)


# ----------------------------------------------------------------------------------------------
# variant names


def test_variant_names():
    v = VS.parse_variant("huber+wd1e-3+vnorm+max+@masks64")
    assert (v.loss, v.weight_decay, v.features.name, v.label_set) == ("huber", 1e-3, "vnorm+max", "masks64")
    assert v.flags(4) == "--features vnorm+max --loss huber --weight-decay 0.001"
    base = VS.parse_variant("base")
    assert base.features.is_default and base.flags(4) == "" and base.train_options(4)["columns"] == "all"
    assert VS.parse_variant("early").resolved_columns(4) == "layers=0-1"
    assert VS.parse_variant("late").resolved_columns(4) == "layers=2-3"
    assert VS.parse_variant("L1-2+nobias+zscore").flags(4) == "--no-region-bias --scaling zscore --columns layers=1-2"
    assert VS.parse_variant("top12").resolved_columns(4) == "top=12"
    assert VS.parse_variant("vonorm+balance").flags(4) == "--features vonorm --balance-families"
    assert VS.parse_variant("balance").train_options(4)["balance"] is True
    for bad in ("foo", "wd", "max+last", "@"):
        with pytest.raises(ValueError):
            VS.parse_variant(bad)


# ----------------------------------------------------------------------------------------------
# the command on tiny label sets


@pytest.fixture(scope="module")
def label_sets(tiny_qwen2_5_vl_dir, tmp_path_factory):
    """Tiny train / validation labels holding mean and vnorm, and a train set of another design."""
    vlm = load_vlm(str(tiny_qwen2_5_vl_dir), device="cpu")
    root = tmp_path_factory.mktemp("variant-labels")
    kw = dict(masks_per_example=8, max_new_tokens=8, progress=False, feature_variants=("mean", "vnorm"))
    LB.collect(vlm, 6, split="train", out=root / "train", **kw)
    LB.collect(vlm, 4, split="val", out=root / "val", **kw)
    LB.collect(
        vlm, 4, split="train", start=10, keep_prob=0.7, out=root / "kp7", **{**kw, "feature_variants": ("mean",)}
    )
    return root


def _run(capsys, *args: str) -> tuple[int, list[str], str]:
    """(exit code, stdout lines, stderr) of the command."""
    from vstream.__main__ import main

    rc = main(["estimator-variants", *args])
    got = capsys.readouterr()
    return rc, got.out.strip().splitlines(), got.err


def _spearman_lds(est, examples) -> float:
    """LDS written out: per span, scipy's Spearman between the subset sums of the region scores
    and the measured effects, spans whose effects vary by less than 1e-4 nats skipped."""
    rho = []
    for e in examples:
        scores = est.predict(e.features.float()).detach().numpy()  # (S, K)
        pred = e.masks.numpy().astype(float) @ scores.T  # (M, S)
        eff = e.effects.double().numpy()
        for s in range(eff.shape[1]):
            if np.ptp(eff[:, s]) < 1e-4:
                continue
            r = spearmanr(pred[:, s], eff[:, s]).statistic
            rho.append(0.0 if np.isnan(r) else r)
    return float(np.mean(rho))


def test_the_command_trains_and_scores_every_variant(label_sets, tmp_path, capsys):
    names = ["base", "vnorm", "log", "huber+wd0", "zscore", "top4", "early", "vnorm+nobias", "@kp7"]
    save = tmp_path / "estimators"
    rc, out, _ = _run(
        capsys,
        *("--train", str(label_sets / "train"), "--val", str(label_sets / "val")),
        *("--train-set", "kp7", str(label_sets / "kp7"), "--variants", ",".join(names)),
        *("--epochs", "3", "--save", str(save)),
    )
    assert rc == 0
    report = json.loads(out[-1])
    rows = report["rows"]
    assert [r["variant"] for r in rows] == names
    table = [line for line in out[:-1] if line.startswith("| ")]
    assert len(table) == 2 + len(names) + 1  # header, rule, one row per variant, raw attention
    assert all(r["variant"] in line for r, line in zip(rows, table[2:]))
    by = {r["variant"]: r for r in rows}
    assert by["vnorm"]["features"] == "vnorm" and by["log"]["features"] == "log" and by["@kp7"]["labels"] == "@kp7"
    assert by["huber+wd0"]["train_estimator_flags"] == "--loss huber --weight-decay 0"
    assert by["early"]["training"]["columns"] == "layers=0-0" and by["top4"]["training"]["columns"] == "top=4"
    assert by["base"]["delta_vs_base"] == 0.0 and report["best"] in names
    assert report["val_split"] == "val" and report["val_examples"] == 4 and not report["val_design_matches_evaluate"]
    for r in rows:
        assert r["val_lds"] is not None and -1 <= r["val_lds"] <= 1 and r["val_spans_scored"] >= 1
        est = E.load(r["estimator"])
        assert est.feature_variant == r["features"] and est.meta["variant_study"]["variant"] == r["variant"]
        _, val = LB.load_labels(label_sets / "val", est.feature_variant)
        assert r["val_lds"] == pytest.approx(_spearman_lds(est, val), abs=1e-4)  # evaluate's LDS, written out
    assert E.load(by["@kp7"]["estimator"]).meta["keep_prob"] == 0.7
    raw = report["raw_attention"]["val_lds"]
    assert raw is not None and -1 <= raw <= 1


def test_the_default_variant_list(label_sets, capsys):
    rc, out, _ = _run(
        capsys,
        *("--train", str(label_sets / "train"), "--val", str(label_sets / "val")),
        *("--train-set", "kp7", str(label_sets / "kp7"), "--epochs", "1", "--json"),
    )
    assert rc == 0 and len(out) == 1
    names = [r["variant"] for r in json.loads(out[0])["rows"]]
    assert names == VS.default_variants(["mean", "vnorm"], 2, 4, ["kp7"])
    assert {
        "base",
        "vnorm",
        "rmean",
        "log",
        "mse",
        "huber",
        "wd0",
        "nobias",
        "zscore",
        "early",
        "late",
        "top4",
        "@kp7",
    } <= set(names)


def test_the_command_refuses_held_out_and_shared_scenes(label_sets, tmp_path, capsys):
    held = tmp_path / "held"
    shutil.copytree(label_sets / "val", held)
    for side in held.glob("labels-*.json"):
        meta = json.loads(side.read_text())
        meta["config"]["split"] = "heldout"
        side.write_text(json.dumps(meta))
    train = ("--train", str(label_sets / "train"))
    rc, _, err = _run(capsys, *train, "--val", str(held), "--variants", "base", "--epochs", "1")
    assert rc == 2 and "held-out split" in err
    rc, _, err = _run(capsys, *train, "--val", str(label_sets / "train"), "--variants", "base", "--epochs", "1")
    assert rc == 2 and "also in the training labels" in err
    val = ("--val", str(label_sets / "val"))
    for variants, why in (
        ("base,tnorm", "collect labels with --features"),
        ("sideways", "unknown token"),
        ("@nowhere", "not given"),
        ("base,zscore+nobias", "'zscore+nobias': zscore scaling"),  # refused before `base` trains
        ("base,vnorm+max", "'vnorm+max': the training labels hold"),  # neither stored nor derivable
    ):
        rc, _, err = _run(capsys, *train, *val, "--variants", variants, "--epochs", "1")
        assert rc == 2 and why in err, (variants, err)


def test_validation_scores_refuse_another_variant(label_sets):
    est, _ = E.train(label_sets / "train", epochs=1, val_fraction=0, progress=False, feature_variant="vnorm")
    _, mean_val = LB.load_labels(label_sets / "val")
    with pytest.raises(VLMError, match="feature variant 'vnorm'"):
        VS.validation_scores(est, mean_val)
    _, vn_val = LB.load_labels(label_sets / "val", "vnorm")
    got = VS.validation_scores(est, vn_val)
    assert got["lds"] == pytest.approx(_spearman_lds(est, vn_val), abs=1e-4) and got["spans"] >= got["spans_scored"]
