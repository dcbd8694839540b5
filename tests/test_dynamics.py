import numpy as np
import pytest

from vstream.attr.dynamics import (
    DynamicsTracker,
    concentration,
    keep_top,
    label_trace,
    path_length,
    pca_path,
    tortuosity,
)


def test_keep_top_zeroes_the_rest():
    v = np.arange(40.0)
    kept = keep_top(v)
    assert (kept[-32:] == v[-32:]).all() and (kept[:8] == 0).all()
    small = np.array([3.0, 1.0, 2.0])
    assert (keep_top(small) == small).all()


def test_straight_path_has_tortuosity_one_and_zigzag_more():
    line = np.array([[0, 0, 0], [1, 0, 0], [2, 0, 0], [3, 0, 0]], float)
    assert path_length(line) == pytest.approx(3.0) and tortuosity(line) == pytest.approx(1.0)
    zig = np.array([[0, 0, 0], [1, 1, 0], [2, 0, 0], [3, 1, 0]], float)
    assert tortuosity(zig) > 1.3
    assert tortuosity(np.zeros((3, 3))) is None and tortuosity(line[:1]) is None


def test_pca_preserves_distances_of_low_rank_data():
    rng = np.random.default_rng(0)
    pts3 = rng.normal(size=(10, 3))
    basis = np.linalg.qr(rng.normal(size=(20, 3)))[0].T  # orthonormal rows: 3 -> 20 dims
    coords, _ = pca_path(pts3 @ basis)
    d = lambda a: np.linalg.norm(a[:, None] - a[None], axis=-1)  # noqa: E731
    assert np.allclose(d(coords), d(pts3), atol=1e-9)


def test_tracker_is_sign_stable_and_grows():
    rng = np.random.default_rng(1)
    direction = rng.normal(size=24)  # K <= 32: keep_top keeps all, the path is a line
    tr = DynamicsTracker()
    prev = None
    for i in range(8):
        p = tr.add(1.0 + 0.3 * i * direction + 0.01 * rng.normal(size=24))
        assert p.path.shape == (i + 1, 3) and p.span_index == i
        if prev is not None and i > 2:
            # refitting with one more point keeps the main axis' orientation (no sign flip)
            assert np.corrcoef(p.path[:-1, 0], prev.path[:, 0])[0, 1] > 0.99
        prev = p
    assert prev.path_length > 0 and prev.tortuosity == pytest.approx(1.0, abs=0.1)


def test_labels():
    k = 20
    fix = [np.eye(k)[3] * 5 + 0.01 for _ in range(6)]
    assert label_trace(fix) == "Fixation"
    rng = np.random.default_rng(2)
    wander = []
    for i in range(8):
        v = rng.random(k) * 0.5 + 1.0
        v[i % k] += 0.6
        wander.append(v)
    assert concentration(wander[0]) < 0.3
    assert label_trace(wander) == "Wandering"
    assert label_trace([]) == "stable"


def test_pca_matches_svd_projection_up_to_sign():
    """Oracle: the eigen-decomposition route gives the SVD's top-3 coordinates, for both the
    Gram (n <= K) and the scatter (n > K) branch; rank-deficient axes are zero."""
    rng = np.random.default_rng(2)
    for n, k in ((6, 16), (20, 16), (40, 8)):
        x = rng.random((n, k))
        coords, axes = pca_path(x)
        centred = x - x.mean(0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        np.testing.assert_allclose(np.abs(coords), np.abs(centred @ vt[:3].T), atol=1e-9)
        np.testing.assert_allclose(axes @ axes.T, np.eye(3), atol=1e-9)
    coords, axes = pca_path(np.array([[0.0, 1, 2, 3], [1, 1, 2, 3]]))  # two points: rank 1
    assert np.allclose(axes[1:], 0) and np.allclose(np.linalg.norm(axes[0]), 1)
    assert np.isclose(np.linalg.norm(coords[1] - coords[0]), 1.0)
