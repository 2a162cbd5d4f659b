"""FID / KID / precision-recall against independent float64 references and closed forms."""

import numpy as np
import pytest
import scipy.linalg

from llcm.evaluation import metrics as M


def random_spd(rng, d, scale=1.0):
    a = rng.normal(size=(d, d))
    return scale * (a @ a.T / d + 0.1 * np.eye(d))


def reference_fd(mu1, s1, mu2, s2):
    """Textbook formula with scipy's sqrtm, written independently of the module."""
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_frechet_diagonal_closed_form():
    rng = np.random.default_rng(0)
    d = 32
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    v1, v2 = rng.uniform(0.2, 3.0, d), rng.uniform(0.2, 3.0, d)
    exact = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    for method in ("psd", "sqrtm"):
        assert M.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2), method=method) == pytest.approx(exact, rel=1e-10)


def test_frechet_matches_scipy_reference_on_full_covariances():
    rng = np.random.default_rng(1)
    d = 64
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d) * 0.1
    s1, s2 = random_spd(rng, d), random_spd(rng, d, 2.0)
    ref = reference_fd(mu1, s1, mu2, s2)
    assert M.frechet_distance(mu1, s1, mu2, s2, "psd") == pytest.approx(ref, rel=1e-9)  # Cholesky branch
    assert M.frechet_distance(mu1, s1, mu2, s2, "sqrtm") == pytest.approx(ref, rel=1e-9)
    assert M.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)


def test_fid_from_samples_approaches_closed_form_and_self_is_zero():
    rng = np.random.default_rng(2)
    d, n = 8, 20000
    v1, v2 = np.linspace(0.5, 2.0, d), np.linspace(2.0, 0.5, d)
    x = rng.normal(size=(n, d)) * np.sqrt(v1)
    y = rng.normal(size=(n, d)) * np.sqrt(v2) + 0.5
    exact = d * 0.25 + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    assert M.fid(x, y) == pytest.approx(exact, rel=0.03)
    assert abs(M.fid(x, x)) < 1e-9
    # rank-deficient covariances (N < D, as with few images and 2048-d features): the low-rank route
    z, w = rng.normal(size=(30, 100)), rng.normal(size=(40, 100)) * 1.5 + 0.2
    assert abs(M.fid(z, z)) < 1e-12 * np.trace(np.cov(z, rowvar=False))
    full = M.frechet_distance(*M.mean_cov(z), *M.mean_cov(w))
    assert M.fid(z, w) == pytest.approx(full, rel=1e-7)  # eigh branch (singular sigma): ~1e-8 round-off
    assert M.frechet_distance_low_rank(x[:500], y[:700]) == pytest.approx(M.fid(x[:500], y[:700]), rel=1e-9)


def brute_force_mmd2(x, y):
    """Unbiased MMD^2 with the cubic kernel, as explicit double sums."""
    d, m = x.shape[1], len(x)
    k = lambda a, b: (a @ b / d + 1.0) ** 3  # noqa: E731
    sxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
    syy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    sxy = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
    return (sxx + syy) / (m * (m - 1)) - 2 * sxy / m ** 2


def test_kid_matches_brute_force():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(40, 5)), rng.normal(size=(40, 5)) * 1.3 + 0.2
    ref = brute_force_mmd2(x, y)
    assert M.mmd2_unbiased(x, y) == pytest.approx(ref, rel=1e-12)
    mean, std = M.kid(x, y, subset_size=1000, n_subsets=3)  # subset = whole set (order does not matter)
    assert mean == pytest.approx(ref, rel=1e-12) and std == pytest.approx(0.0, abs=1e-12)


def test_kid_zero_mean_gaussians_closed_form():
    # zero means: E k(X, Y) = 1 + 3 tr(Sx Sy) / d^2, so MMD^2 = 3 ||Sx - Sy||_F^2 / d^2 = 3 (sx^2 - sy^2)^2 / d
    rng = np.random.default_rng(4)
    d, n, sx, sy = 16, 3000, 1.0, 1.3
    x, y = rng.normal(size=(n, d)) * sx, rng.normal(size=(n, d)) * sy
    exact = 3 * (sx ** 2 - sy ** 2) ** 2 / d
    mean, std = M.kid(x, y, subset_size=400, n_subsets=20, seed=0)
    assert mean == pytest.approx(exact, rel=0.1)
    # identical distributions: ~0 within the subset spread
    mean0, std0 = M.kid(x, rng.normal(size=(n, d)) * sx, subset_size=400, n_subsets=20)
    assert abs(mean0) < 0.05 * exact and abs(mean0) < 2 * std0


def test_precision_recall_constructed():
    rng = np.random.default_rng(5)
    d, n = 4, 1000
    centers = np.eye(d) * 20.0
    real = centers[rng.integers(0, 4, n)] + rng.normal(size=(n, d))
    same = centers[rng.integers(0, 4, n)] + rng.normal(size=(n, d))
    pr = M.precision_recall(real, same, k=3)
    assert pr["precision"] > 0.85 and pr["recall"] > 0.85 and pr["coverage"] > 0.85
    assert 0.7 < pr["density"] < 1.3
    collapsed = centers[0] + rng.normal(size=(n, d))  # all samples in one of four modes
    pr = M.precision_recall(real, collapsed, k=3)
    assert pr["precision"] > 0.85 and 0.15 < pr["recall"] < 0.3
    disjoint = real + 100.0
    pr = M.precision_recall(real, disjoint, k=3)
    assert pr["precision"] == 0.0 and pr["recall"] == 0.0 and pr["coverage"] == 0.0
    # chunking does not change the answer
    assert M.precision_recall(real, same, k=3, chunk=97) == M.precision_recall(real, same, k=3)


def test_compute_all_names_results_and_refuses_mixing(tmp_path):
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(300, 6)), rng.normal(size=(200, 6)) + 0.3
    out = M.compute_all(x, y, extractor="filterbank-v1", kid_subset_size=100, kid_subsets=10)
    assert out["extractor"] == "filterbank-v1" and out["n_real"] == 300 and out["n_fake"] == 200
    assert set(out) >= {"fid", "kid_mean", "kid_std", "precision", "recall", "density", "coverage"}
    assert out["fid"] == pytest.approx(M.fid(x, y))
    a = M.FeatureStats.from_features(x, "inception")
    b = M.FeatureStats.from_features(y, "filterbank-v1")
    with pytest.raises(ValueError, match="different extractors"):
        M.fid(a, b)
    with pytest.raises(ValueError):
        M.compute_all(a, y, extractor="filterbank-v1")


def test_stats_cache_roundtrip_and_reuse(tmp_path):
    rng = np.random.default_rng(7)
    x = rng.normal(size=(50, 5))
    calls = []

    def compute():
        calls.append(1)
        return x

    path = tmp_path / "real.npz"
    s1 = M.cached_stats(path, "filterbank-v1", "key-a", compute)
    s2 = M.cached_stats(path, "filterbank-v1", "key-a", compute)
    assert len(calls) == 1
    np.testing.assert_array_equal(s1.mu, s2.mu)
    np.testing.assert_array_equal(s1.sigma, s2.sigma)
    assert s2.n == 50 and s2.extractor == "filterbank-v1"
    np.testing.assert_array_equal(s1.features, s2.features)  # first run == cached runs
    assert M.fid(s2, x) == pytest.approx(0.0, abs=1e-12)  # cached mu/sigma are exact float64
    M.cached_stats(path, "filterbank-v1", "key-b", compute)  # other data -> recomputed
    M.cached_stats(path, "inception", "key-b", compute)  # other extractor -> recomputed
    assert len(calls) == 3
    assert M.fingerprint(x) != M.fingerprint(x + 1) and M.fingerprint(x) == M.fingerprint(x.copy())
