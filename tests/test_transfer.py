"""Transfer analysis on synthetic labels whose ablation effects follow a per-family linear law."""

import numpy as np
import torch

from vstream.attr import transfer
from vstream.attr.labels import LabeledExample

K, LH, M = 8, 6, 24
LAWS = {"alpha": np.array([3.0, 0, 0, 0, 0, 1]), "beta": np.array([0, 0, 3.0, 0, 1, 0])}


def _examples(family, n, seed):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        feats = rng.random((2, K, LH)).astype(np.float32)
        masks = rng.random((M, K)) < 0.5
        effects = masks @ (feats @ LAWS[family]).T + 0.05 * rng.standard_normal((M, 2))
        out.append(
            LabeledExample(
                index=i,
                seed=seed * 10_000 + i,
                family=family,
                features=torch.from_numpy(feats),
                masks=torch.from_numpy(masks),
                effects=torch.from_numpy(effects.astype(np.float32)),
                base=torch.zeros(2),
                assignment=torch.eye(K, dtype=torch.uint8),
                tokens=torch.zeros(4, dtype=torch.long),
            )
        )
    return out


def test_family_matrix_in_domain_beats_transfer_and_the_mixture_recovers():
    train = _examples("alpha", 40, 1) + _examples("beta", 40, 2)
    held = _examples("alpha", 20, 3) + _examples("beta", 20, 4)
    res = transfer.family_matrix(train, held, epochs=60)
    lds = res["lds"]
    assert lds["alpha"]["alpha"] > 0.8 and lds["beta"]["beta"] > 0.8
    assert lds["alpha"]["beta"] < lds["beta"]["beta"] - 0.1
    assert lds["mixture"]["alpha"] > lds["beta"]["alpha"]
    assert res["kept"]["alpha"]["alpha"] == 1.0 and res["kept_off_diagonal_mean"] < 0.95
    assert res["train_examples"] == {"alpha": 40, "beta": 40, "mixture": 80}


def test_size_curve_and_region_methods():
    train, held = _examples("alpha", 60, 5), _examples("alpha", 20, 6)
    curve = transfer.size_curve(train, held, sizes=(10, 30, 500), epochs=40)
    assert list(curve["lds"]) == ["10", "30", "60"]
    assert all(v is not None and -1 <= v <= 1 for v in curve["lds"].values())
    noise = _examples("beta", 30, 7)
    res = transfer.region_methods({"semantic": (train, held), "blocks": (noise, held)}, epochs=40)
    assert res["train_examples_each"] == 30
    assert res["semantic"]["lds"] > res["blocks"]["lds"]
