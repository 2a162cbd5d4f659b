"""Memorization check: is a generated image a (near-)copy of a training image?

For every generated image we find its nearest training image two ways:
  1. feature cosine similarity, after centering both sets on the training-feature mean (raw
     Inception/filterbank features are all positive, so uncentered cosines are high for any pair);
  2. SSIM on small grayscale versions (ssim_size x ssim_size, default 32: small enough that sensor-like
     noise averages out), implemented here with numpy/scipy as in Wang et al. 2004 (Gaussian window
     sigma 1.5, K1 0.01, K2 0.03, population covariances, mean over the valid region; equal to
     scikit-image's structural_similarity(gaussian_weights=True, use_sample_covariance=False,
     data_range=1), which the tests check). It is the maximum over integer shifts of up to
     `max_shift` pixels at that size, so a slightly moved copy still counts. SSIM is searched among the
     `ssim_candidates` training images of highest pixel correlation plus the feature nearest neighbour
     (None = all training images).
A generated image is flagged when cosine >= cos_threshold or SSIM >= ssim_threshold. By default the
thresholds are set from the data: the same scores are computed for `baseline_samples` training images
against the rest of the training set, and with q the largest baseline score the threshold is
t = q + margin * (1 - q): halfway to identity for SSIM (margin 1/2), three quarters for the feature cosine
(margin 3/4: in our tests fresh samples' nearest-neighbour cosines had a heavier upper tail than the
training baseline, while SSIM tails matched). A flagged image is much closer to one training image
than any sampled training image is to another. A training set with near-duplicates of its own has
q ~ 1, and then only exact copies are flagged; the report shows the baseline, so dedupe the data (the
data builder does) or pass explicit thresholds.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from llcm.evaluation.features import ImageBatch, as_image_list, resize_float

SSIM_SIGMA, SSIM_TRUNCATE, SSIM_K1, SSIM_K2 = 1.5, 3.5, 0.01, 0.03


class MemorizationWarning(UserWarning):
    """Raised (as a warning) when generated images look like copies of training images."""


# ----------------------------------------------------------------------------------------------
# SSIM


def to_gray_small(images: ImageBatch, size: int) -> np.ndarray:
    """uint8 images -> float32 [N, size, size] luminance in [0, 1] (PIL bicubic on float values)."""
    out = []
    for im in as_image_list(images):
        y = im.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        out.append(resize_float(y, (size, size)).clip(0, 255) / 255.0)
    return np.stack(out).astype(np.float32) if out else np.zeros((0, size, size), np.float32)


@functools.lru_cache(maxsize=64)
def _blur_matrix(n: int) -> np.ndarray:
    """[n - 2 pad, n] matrix of scipy's 1-D Gaussian filter (sigma 1.5, truncate 3.5, 'reflect'), keeping
    only the rows that SSIM averages over: blur(x)[pad:-pad] == M @ x."""
    pad = int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5)
    if n <= 2 * pad:
        raise ValueError(f"SSIM needs images larger than {2 * pad} pixels per side, got {n}")
    full = ndimage.gaussian_filter1d(np.eye(n), SSIM_SIGMA, axis=0, truncate=SSIM_TRUNCATE, mode="reflect")
    return full[pad:n - pad]


# SSIM = mean[(2 mu_x mu_y + C1)(2 s_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(s_x^2 + s_y^2 + C2))]  (Wang et al. 2004, eq. 13)
def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> np.ndarray:
    """SSIM of images a, b [..., H, W] (broadcast over leading axes), float64 [...].

    The separable Gaussian window is applied as two small matrix products (rows, then columns), which
    equals scipy.ndimage.gaussian_filter in 'reflect' mode, cropped to the valid region.
    """
    a, b = np.broadcast_arrays(np.asarray(a, np.float64), np.asarray(b, np.float64))
    gh, gw = _blur_matrix(a.shape[-2]), _blur_matrix(a.shape[-1])

    def blur(x):
        return gh @ x @ gw.T

    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a ** 2
    var_b = blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return s.mean(axis=(-2, -1))


# ----------------------------------------------------------------------------------------------
# Nearest neighbours


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def nearest_by_cosine(query: np.ndarray, train: np.ndarray, center: np.ndarray | None = None,
                      exclude: np.ndarray | None = None, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Index and cosine similarity of each query row's nearest training row (exclude[i] = a train
    index to skip for query i, e.g. itself)."""
    center = train.mean(axis=0) if center is None else center
    q, t = _unit_rows(query - center), _unit_rows(train - center)
    idx, sim = np.empty(len(q), dtype=np.int64), np.empty(len(q))
    for i in range(0, len(q), chunk):
        s = q[i:i + chunk] @ t.T
        if exclude is not None:
            s[np.arange(len(s)), exclude[i:i + chunk]] = -np.inf
        idx[i:i + chunk] = s.argmax(axis=1)
        sim[i:i + chunk] = s[np.arange(len(s)), idx[i:i + chunk]]
    return idx, sim


def shifted_ssim(query: np.ndarray, train: np.ndarray, max_shift: int = 1) -> np.ndarray:
    """max over integer shifts |dy|, |dx| <= max_shift of SSIM on the overlapping region.

    query [H, W], train [K, H, W] -> [K]. A copy moved by a pixel or two at the small size still
    scores as a copy; the overlap shrinks by at most 2 * max_shift rows and columns.
    """
    best = np.full(len(train), -np.inf)
    h, w = query.shape
    for dy in range(-max_shift, max_shift + 1):
        for dx in range(-max_shift, max_shift + 1):
            qy, ty = (slice(dy, h), slice(0, h - dy)) if dy >= 0 else (slice(0, h + dy), slice(-dy, h))
            qx, tx = (slice(dx, w), slice(0, w - dx)) if dx >= 0 else (slice(0, w + dx), slice(-dx, w))
            best = np.maximum(best, ssim(query[qy, qx], train[:, ty, tx]))
    return best


def ssim_candidates_by_correlation(query: np.ndarray, train: np.ndarray, k: int,
                                   exclude: np.ndarray | None = None, chunk: int = 512) -> np.ndarray:
    """[N_query, k] indices of the training images with the highest Pearson correlation of pixels."""
    def flat(x):
        f = x.reshape(len(x), -1).astype(np.float64)
        return _unit_rows(f - f.mean(axis=1, keepdims=True))
    q, t = flat(query), flat(train)
    out = np.empty((len(q), k), dtype=np.int64)
    for i in range(0, len(q), chunk):
        corr = q[i:i + chunk] @ t.T
        if exclude is not None:
            corr[np.arange(len(corr)), exclude[i:i + chunk]] = -np.inf
        out[i:i + chunk] = np.argpartition(-corr, k - 1, axis=1)[:, :k]
    return out


def nearest_by_ssim(query: np.ndarray, train: np.ndarray, candidates: int | None = 32,
                    extra: np.ndarray | None = None, exclude: np.ndarray | None = None,
                    max_shift: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Index and (shift-tolerant) SSIM of each query's most similar training image.

    Inputs are small grayscale stacks [N, s, s] in [0, 1]. With `candidates` = K, SSIM is computed
    against the K training images of highest pixel correlation plus `extra[i]` (e.g. the feature
    nearest neighbour); None computes it against every training image. `exclude[i]` is skipped.
    """
    n_train = len(train)
    exhaustive = candidates is None or candidates >= n_train - (exclude is not None)
    shortlist = None if exhaustive else ssim_candidates_by_correlation(query, train, candidates, exclude)
    idx, best = np.empty(len(query), dtype=np.int64), np.empty(len(query))
    for i in range(len(query)):
        cand = np.arange(n_train) if shortlist is None else shortlist[i]
        if extra is not None:
            cand = np.union1d(cand, extra[i:i + 1])
        if exclude is not None:
            cand = cand[cand != exclude[i]]
        scores = np.concatenate([shifted_ssim(query[i], train[cand[j:j + 256]], max_shift)
                                 for j in range(0, len(cand), 256)])
        k = int(np.argmax(scores))
        idx[i], best[i] = cand[k], scores[k]
    return idx, best


# ----------------------------------------------------------------------------------------------
# Report


@dataclasses.dataclass
class MemorizationReport:
    extractor: str
    feature_index: np.ndarray  # [N_gen] nearest training image by centered feature cosine
    feature_cosine: np.ndarray  # [N_gen]
    ssim_index: np.ndarray  # [N_gen] most similar training image by SSIM
    ssim: np.ndarray  # [N_gen]
    cos_threshold: float
    ssim_threshold: float
    ssim_size: int
    max_shift: int
    ssim_candidates: int | None
    baseline: dict  # train -> rest-of-train nearest scores: {"n", "cosine": {...}, "ssim": {...}}

    @property
    def flagged(self) -> np.ndarray:
        return (self.feature_cosine >= self.cos_threshold) | (self.ssim >= self.ssim_threshold)

    @property
    def share_flagged(self) -> float:
        return float(self.flagged.mean()) if len(self.ssim) else 0.0

    @property
    def copies_found(self) -> bool:
        return bool(self.flagged.any())

    def top_pairs(self, n: int = 8, by: str = "ssim") -> list[dict]:
        """The n closest (generated, training) pairs by 'ssim' or 'cosine', closest first."""
        score, index = {"ssim": (self.ssim, self.ssim_index),
                        "cosine": (self.feature_cosine, self.feature_index)}[by]
        order = np.argsort(-score, kind="stable")[:n]
        return [{"gen": int(g), "train": int(index[g]), "by": by, "score": float(score[g]),
                 "flagged": bool(self.flagged[g])} for g in order]

    def summary(self, n_top: int = 8) -> dict:
        """JSON-ready summary (thresholds, shares, score quantiles, baseline, top pairs)."""
        def q(x):
            return _quantiles(x) if len(x) else {}
        return {
            "extractor": self.extractor, "n_gen": int(len(self.ssim)),
            "cos_threshold": self.cos_threshold, "ssim_threshold": self.ssim_threshold,
            "ssim_size": self.ssim_size, "max_shift": self.max_shift, "ssim_candidates": self.ssim_candidates,
            "n_flagged": int(self.flagged.sum()), "share_flagged": self.share_flagged,
            "share_cos_above": float((self.feature_cosine >= self.cos_threshold).mean()) if len(self.ssim) else 0.0,
            "share_ssim_above": float((self.ssim >= self.ssim_threshold).mean()) if len(self.ssim) else 0.0,
            "copies_found": self.copies_found,
            "cosine": q(self.feature_cosine), "ssim": q(self.ssim), "baseline": self.baseline,
            "top_by_ssim": self.top_pairs(n_top, "ssim"), "top_by_cosine": self.top_pairs(n_top, "cosine"),
        }


def _quantiles(x: np.ndarray) -> dict:
    return {"median": float(np.median(x)), "p99": float(np.quantile(x, 0.99)), "max": float(x.max())}


AUTO_MARGIN = {"ssim": 0.5, "cosine": 0.75}


def auto_threshold(baseline_max: float, margin: float) -> float:
    """t = q + margin (1 - q): between the training set's largest nearest-neighbour score and identity."""
    return float(baseline_max + margin * (1.0 - baseline_max))


def find_copies(gen_images: ImageBatch, train_images: ImageBatch, gen_feats: np.ndarray,
                train_feats: np.ndarray, extractor: str, cos_threshold: float | None = None,
                ssim_threshold: float | None = None, ssim_size: int = 32, max_shift: int = 1,
                ssim_candidates: int | None = 32, baseline_samples: int = 200, seed: int = 0,
                warn: bool = True) -> MemorizationReport:
    """Nearest training image of every generated image by feature cosine and by SSIM; flags copies.

    `gen_feats` / `train_feats` are one extractor's rows (named by `extractor`) for the same images in
    the same order. Thresholds left as None are set from the training baseline (see the module doc;
    0.95 / 0.9 if baseline_samples = 0). Emits a MemorizationWarning when any image is flagged.
    """
    gen_feats, train_feats = np.asarray(gen_feats, np.float64), np.asarray(train_feats, np.float64)
    g_small, t_small = to_gray_small(gen_images, ssim_size), to_gray_small(train_images, ssim_size)
    if len(g_small) != len(gen_feats) or len(t_small) != len(train_feats):
        raise ValueError("images and features must have the same number of rows")
    center = train_feats.mean(axis=0)
    f_idx, f_cos = nearest_by_cosine(gen_feats, train_feats, center)
    s_idx, s_val = nearest_by_ssim(g_small, t_small, ssim_candidates, extra=f_idx, max_shift=max_shift)

    baseline: dict = {"n": 0}
    if baseline_samples and len(train_feats) > 1:
        rng = np.random.default_rng(seed)
        pick = np.sort(rng.choice(len(train_feats), min(baseline_samples, len(train_feats)), replace=False))
        b_idx, b_cos = nearest_by_cosine(train_feats[pick], train_feats, center, exclude=pick)
        _, b_ssim = nearest_by_ssim(t_small[pick], t_small, ssim_candidates, extra=b_idx, exclude=pick,
                                    max_shift=max_shift)
        baseline = {"n": int(len(pick)), "cosine": _quantiles(b_cos), "ssim": _quantiles(b_ssim)}
    auto = baseline["n"] > 0
    if cos_threshold is None:
        cos_threshold = auto_threshold(baseline["cosine"]["max"], AUTO_MARGIN["cosine"]) if auto else 0.95
    if ssim_threshold is None:
        ssim_threshold = auto_threshold(baseline["ssim"]["max"], AUTO_MARGIN["ssim"]) if auto else 0.9

    report = MemorizationReport(extractor, f_idx, f_cos, s_idx, s_val, float(cos_threshold),
                                float(ssim_threshold), ssim_size, max_shift, ssim_candidates, baseline)
    if warn and report.copies_found:
        top = report.top_pairs(1, "ssim")[0]
        warnings.warn(MemorizationWarning(
            f"{int(report.flagged.sum())} of {len(s_val)} generated images look like training copies "
            f"(cosine >= {cos_threshold:.3f} on {extractor} features or SSIM >= {ssim_threshold:.3f}); "
            f"closest: generated #{top['gen']} vs training #{top['train']}, SSIM {top['score']:.3f}"),
            stacklevel=2)
    return report


# ----------------------------------------------------------------------------------------------
# Pictures for the report


def _tile(image: np.ndarray, size: int) -> Image.Image:
    return Image.fromarray(as_image_list([image])[0]).resize((size, size), Image.BICUBIC)


def compose_pair(gen_image: np.ndarray, train_image: np.ndarray, caption: str = "",
                 size: int = 128, pad: int = 4) -> Image.Image:
    """Side-by-side [generated | training] picture with an optional one-line caption underneath."""
    text_h = 14 if caption else 0
    canvas = Image.new("RGB", (2 * size + 3 * pad, size + 2 * pad + text_h), "white")
    canvas.paste(_tile(gen_image, size), (pad, pad))
    canvas.paste(_tile(train_image, size), (2 * pad + size, pad))
    if caption:
        ImageDraw.Draw(canvas).text((pad, size + pad + 1), caption, fill="black")
    return canvas


def compose_pairs(gen_images: Sequence[np.ndarray] | np.ndarray, train_images: Sequence[np.ndarray] | np.ndarray,
                  pairs: list[dict], size: int = 128, columns: int = 2) -> Image.Image:
    """A grid of compose_pair pictures for `pairs` (from MemorizationReport.top_pairs)."""
    tiles = []
    for p in pairs:
        mark = " COPY?" if p["flagged"] else ""
        caption = f"gen {p['gen']} | train {p['train']}  {p['by']} {p['score']:.3f}{mark}"
        tiles.append(compose_pair(gen_images[p["gen"]], train_images[p["train"]], caption, size))
    if not tiles:
        return Image.new("RGB", (1, 1), "white")
    w, h = tiles[0].size
    rows = (len(tiles) + columns - 1) // columns
    grid = Image.new("RGB", (w * min(columns, len(tiles)), h * rows), "white")
    for i, t in enumerate(tiles):
        grid.paste(t, ((i % columns) * w, (i // columns) * h))
    return grid
