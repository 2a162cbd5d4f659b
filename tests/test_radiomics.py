"""The radiomics extractor and FRD (llcm radiomics features): finite features in every degenerate case, and
a distance that separates distributions, grows with a degradation and is small between two draws of one."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

pytest.importorskip("skimage")

from llcm.evaluation.features import FeatureExtractor  # noqa: E402
from llcm.evaluation.radiomics import RadiomicsExtractor, frd  # noqa: E402

SIZE = 48
N = 60


def blobs(n: int, seed: int) -> np.ndarray:
    """Smooth phantoms: 3-6 Gaussian blobs on a dark background, mild noise. float [n, SIZE, SIZE] in [0, 255]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    out = np.full((n, SIZE, SIZE), 30.0)
    for im in out:
        for _ in range(rng.integers(3, 7)):
            cy, cx = rng.uniform(8, SIZE - 8, 2)
            s = rng.uniform(4, 9)
            im += rng.uniform(60, 140) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
    return np.clip(out + rng.normal(0, 2, out.shape), 0, 255)


def texture(n: int, seed: int) -> np.ndarray:
    """High-frequency texture of about the same brightness: white noise blurred at sigma 0.7."""
    rng = np.random.default_rng(seed)
    t = ndimage.gaussian_filter(rng.normal(size=(n, SIZE, SIZE)), (0, 0.7, 0.7))
    return np.clip(80 + 120 * t / t.std(), 0, 255)


def u8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def ex() -> RadiomicsExtractor:
    return RadiomicsExtractor()


def test_follows_the_extractor_protocol(ex):
    got = ex
    assert isinstance(got, FeatureExtractor)
    assert got.name == "radiomics" and got.dim == len(got.feature_names) == 169
    assert len(set(got.feature_names)) == got.dim and "FRD (llcm radiomics features)" in got.description


@pytest.mark.parametrize("kind", ["constant-0", "constant-255", "constant-mid", "random", "rgb", "gray-1ch",
                                  "one-pixel-on", "mixed-sizes"])
def test_features_are_finite_with_the_right_shape(ex, kind):
    rng = np.random.default_rng(0)
    images = {
        "constant-0": np.zeros((3, 32, 32), np.uint8),
        "constant-255": np.full((3, 32, 32, 3), 255, np.uint8),
        "constant-mid": np.full((2, 40, 24), 117, np.uint8),
        "random": rng.integers(0, 256, (4, 32, 32), dtype=np.uint8),
        "rgb": rng.integers(0, 256, (4, 32, 40, 3), dtype=np.uint8),
        "gray-1ch": rng.integers(0, 256, (4, 32, 32, 1), dtype=np.uint8),
        "one-pixel-on": np.pad(np.full((2, 1, 1), 255, np.uint8), ((0, 0), (10, 21), (5, 26))),
        "mixed-sizes": [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), np.zeros((20, 28), np.uint8),
                        rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)],
    }[kind]
    f = ex(images)
    assert f.shape == (len(images), len(ex.feature_names)) and f.dtype == np.float64
    assert np.isfinite(f).all()


def test_degenerate_values_of_a_constant_image(ex):
    f = dict(zip(ex.feature_names, ex(np.full((1, 32, 32), 200, np.uint8))[0]))
    assert f["intensity/mean"] == 200 and f["intensity/std"] == 0 and f["original/entropy"] == 0
    assert f["original/uniformity"] == 1 and f["original/skewness"] == 0 and f["original/kurtosis"] == 0
    assert f["original/range"] == 0 and f["original/median"] == 0  # standardized: 0 everywhere
    assert f["original/glcm-contrast-d1"] == 0 and f["original/glcm-homogeneity-d4"] == 1
    assert f["log-s2/std"] == 0 and f["fine/glcm-ASM-d2"] == 1


def test_grey_as_rgb_equals_grey_and_colour_uses_luma(ex):
    rng = np.random.default_rng(1)
    g = rng.integers(0, 256, (2, 32, 32), dtype=np.uint8)
    np.testing.assert_array_equal(ex(g), ex(np.repeat(g[..., None], 3, axis=-1)))
    rgb = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    mean = dict(zip(ex.feature_names, ex(rgb).T))["intensity/mean"]
    np.testing.assert_allclose(mean, (rgb @ np.array([0.299, 0.587, 0.114])).mean(axis=(1, 2)))


def test_first_order_matches_scipy_and_numpy(ex):
    from scipy import stats

    x = np.random.default_rng(2).integers(0, 256, (3, 32, 32), dtype=np.uint8)
    f = dict(zip(ex.feature_names, ex(x).T))
    flat = x.reshape(3, -1).astype(np.float64)
    np.testing.assert_allclose(f["intensity/std"], flat.std(axis=1))
    z = stats.zscore(flat, axis=1)  # the original image type is the standardized image
    np.testing.assert_allclose(f["original/skewness"], stats.skew(flat, axis=1))
    np.testing.assert_allclose(f["original/kurtosis"], stats.kurtosis(flat, axis=1))
    np.testing.assert_allclose(f["original/p90"], np.percentile(z, 90, axis=1))
    levels = np.clip(np.floor((z + 4) * 4), 0, 31).astype(int)  # 32 bins of 0.25 std on [-4, 4)
    p = np.stack([np.bincount(r, minlength=32) for r in levels]) / flat.shape[1]
    np.testing.assert_allclose(f["original/entropy"], stats.entropy(p, base=2, axis=1))


def test_each_image_is_filtered_on_its_own(ex):
    """A stack's images must not leak into each other (sigma 0 along the batch axis)."""
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (3, 32, 32), dtype=np.uint8)
    np.testing.assert_allclose(ex(x), np.concatenate([ex(x[i:i + 1]) for i in range(3)]), atol=1e-9)


def test_frd_separates_distributions(ex):
    real, again = ex(u8(blobs(N, 10))), ex(u8(blobs(N, 11)))
    same = frd(real, again)
    tex = frd(real, ex(u8(texture(N, 12))))
    blurred = frd(real, ex(u8(ndimage.gaussian_filter(blobs(N, 11), (0, 1.5, 1.5)))))
    assert np.isfinite(same) and same + 2.0 < blurred < tex  # log scale: 2.0 = a factor e^2 ~ 7.4


def test_frd_grows_with_noise(ex):
    clean = blobs(N, 20)
    real = ex(u8(clean))
    rng = np.random.default_rng(21)
    other = blobs(N, 22)
    vals = [frd(real, ex(u8(other + rng.normal(0, s, other.shape)))) for s in (0, 10, 30)]
    assert vals[0] < vals[1] < vals[2], vals


def test_brightness_still_counts_after_standardization(ex):
    """Images are standardized before the texture features, but the raw mean/std features keep a global
    brightness change visible (weakly, as in frd-score, whose raw-intensity diagnostics are a few of 398)."""
    real, other = ex(u8(blobs(N, 30))), blobs(N, 31)
    assert frd(real, ex(u8(other + 60))) > frd(real, ex(u8(other))) + 0.5


def test_frd_conventions():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(50, 5))
    # invariant to a per-feature affine map applied to both sets (z-scoring with the real set's statistics)
    y = rng.normal(0.5, 1.0, size=(40, 5))
    scale, shift = np.array([1e-3, 1, 10, 1e4, 2]), np.arange(5.0)
    assert frd(x * scale + shift, y * scale + shift) == pytest.approx(frd(x, y), rel=1e-9)
    # a feature constant in the real set is dropped, whatever the fake set does with it
    xc, yc = np.c_[x, np.ones(50)], np.c_[y, rng.normal(size=40)]
    assert frd(xc, yc) == pytest.approx(frd(x, y), rel=1e-12)
    assert frd(x, x) == -np.inf and frd(x[::-1], x) == -np.inf  # identical sets, whatever the round-off
    with pytest.raises(ValueError):
        frd(x, y[:, :4])
    with pytest.raises(ValueError):
        frd(np.ones((5, 3)), y[:, :3])
