"""Memorization: SSIM against scikit-image, planted copies flagged, fresh samples not flagged."""

import json
import warnings

import numpy as np
import pytest
from scipy import ndimage

from llcm.evaluation import features as F
from llcm.evaluation import memorization as mem


def phantoms(n, size=96, seed=0):
    """Random ellipse 'head' phantoms (CT-like slices), uint8 [n, size, size, 3]; one seed per set."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[-1:1:size * 1j, -1:1:size * 1j]
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        img = np.zeros((size, size))
        cx, cy = rng.uniform(-0.1, 0.1, 2)
        a, b = rng.uniform(0.6, 0.85, 2)
        head = ((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2 <= 1
        img[head] = rng.uniform(0.55, 0.75)
        for _ in range(rng.integers(3, 7)):
            ex, ey = rng.uniform(-0.5, 0.5, 2)
            ea, eb = rng.uniform(0.05, 0.3, 2)
            c, s = np.cos(th := rng.uniform(0, np.pi)), np.sin(th)
            u, v = (xx - ex) * c + (yy - ey) * s, -(xx - ex) * s + (yy - ey) * c
            img[((u / ea) ** 2 + (v / eb) ** 2 <= 1) & head] = rng.uniform(0.1, 1.0)
        img = ndimage.gaussian_filter(img, 1.0) + rng.normal(0, 0.01, img.shape)
        out[i] = (img.clip(0, 1) * 255).round().astype(np.uint8)[..., None]
    return out


@pytest.fixture(scope="module")
def data():
    ex = F.get_extractor("filterbank")
    train, fresh = phantoms(100, seed=1), phantoms(24, seed=11)
    rng = np.random.default_rng(0)
    noised = (train[6] + rng.normal(0, 4, train[6].shape)).clip(0, 255).round().astype(np.uint8)
    copies = np.stack([train[5], noised, np.roll(train[7], (2, 2), axis=(0, 1)), np.roll(train[9], 3, axis=1)])
    return {"ex": ex, "train": train, "fresh": fresh, "copies": copies, "sources": [5, 6, 7, 9],
            "f_train": ex(train), "f_fresh": ex(fresh), "f_copies": ex(copies)}


def test_ssim_matches_scikit_image():
    sk = pytest.importorskip("skimage.metrics")
    rng = np.random.default_rng(0)
    a = rng.random((3, 40, 37))
    b = (a + rng.normal(0, 0.2, a.shape)).clip(0, 1)
    ours = mem.ssim(a, b)
    ref = [sk.structural_similarity(a[i], b[i], gaussian_weights=True, sigma=1.5,
                                    use_sample_covariance=False, data_range=1.0) for i in range(3)]
    np.testing.assert_allclose(ours, ref, rtol=1e-12)
    assert mem.ssim(a[0], a[0]) == pytest.approx(1.0)
    np.testing.assert_allclose(mem.ssim(a[0], b), ours[:1].tolist() + list(mem.ssim(a[0], b[1:])))  # broadcasting


def test_planted_copies_are_flagged(data):
    gen = np.concatenate([data["fresh"], data["copies"]])
    feats = np.concatenate([data["f_fresh"], data["f_copies"]])
    with pytest.warns(mem.MemorizationWarning, match="4 of 28"):
        report = mem.find_copies(gen, data["train"], feats, data["f_train"], data["ex"].name)
    n = len(data["fresh"])
    assert report.flagged[n:].all() and not report.flagged[:n].any()
    assert report.share_flagged == pytest.approx(4 / 28) and report.copies_found
    # each copy is matched to its source training image by SSIM (shift-tolerant)
    assert report.ssim_index[n:].tolist() == data["sources"]
    assert report.ssim[n] == pytest.approx(1.0) and report.feature_cosine[n] == pytest.approx(1.0)
    top = report.top_pairs(4, "ssim")
    assert {p["gen"] for p in top} == set(range(n, n + 4)) and all(p["flagged"] for p in top)
    summary = report.summary()
    json.dumps(summary)  # JSON-ready for the report
    assert summary["n_flagged"] == 4 and summary["baseline"]["n"] == 100
    assert summary["ssim_threshold"] == pytest.approx((1 + summary["baseline"]["ssim"]["max"]) / 2)
    pic = mem.compose_pairs(gen, data["train"], top, size=64, columns=2)
    assert pic.size == (2 * (2 * 64 + 12), 2 * (64 + 8 + 14))


def test_fresh_samples_are_not_flagged(data):
    with warnings.catch_warnings():
        warnings.simplefilter("error", mem.MemorizationWarning)
        report = mem.find_copies(data["fresh"], data["train"], data["f_fresh"], data["f_train"],
                                 data["ex"].name, baseline_samples=50)
    assert not report.copies_found and report.share_flagged == 0.0
    assert report.ssim.max() < report.ssim_threshold and report.feature_cosine.max() < report.cos_threshold


def test_explicit_thresholds_and_exhaustive_search(data):
    gen = data["copies"][:2]
    report = mem.find_copies(gen, data["train"], data["f_copies"][:2], data["f_train"], "filterbank-v1",
                             cos_threshold=0.5, ssim_threshold=0.5, ssim_candidates=None,
                             baseline_samples=0, warn=False)
    assert report.cos_threshold == 0.5 and report.baseline == {"n": 0}
    assert report.ssim_index.tolist() == [5, 6] and report.flagged.all()
