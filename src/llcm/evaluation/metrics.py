"""Distribution metrics on feature vectors: FID, KID, precision/recall (+ density/coverage).

Everything is computed in float64 on [N, D] feature arrays produced by ONE extractor; results carry
that extractor's name, and functions that receive two named inputs refuse to mix extractors.
Reference-set statistics (mu, sigma and, by default, the features for KID/PR) are cached in .npz
files so that evaluating many models against one real set extracts its features once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Sequence, Union

import numpy as np
import scipy.linalg

Features = Union[np.ndarray, "FeatureStats"]
STATS_FORMAT = "llcm-feature-stats-v1"


# ----------------------------------------------------------------------------------------------
# Statistics and their cache


@dataclasses.dataclass(frozen=True)
class FeatureStats:
    """Gaussian statistics of one image set under one extractor (+ the features, optional)."""

    mu: np.ndarray  # [D] float64
    sigma: np.ndarray  # [D, D] float64, unbiased (ddof = 1) like every FID implementation
    n: int
    extractor: str
    key: str = ""  # what the statistics were computed from (see `fingerprint`); "" = unknown
    features: np.ndarray | None = None  # [n, D], kept for KID and precision/recall

    @classmethod
    def from_features(cls, feats: np.ndarray, extractor: str, key: str = "",
                      keep_features: bool = True) -> "FeatureStats":
        feats = np.asarray(feats, dtype=np.float64)
        if feats.ndim != 2 or len(feats) < 2:
            raise ValueError(f"need features [N >= 2, D], got shape {feats.shape}")
        mu, sigma = mean_cov(feats)
        return cls(mu, sigma, len(feats), extractor, key, feats if keep_features else None)


def mean_cov(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sample mean and unbiased covariance (np.cov(rowvar=False)), float64."""
    feats = np.asarray(feats, dtype=np.float64)
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def save_stats(path: str | os.PathLike, stats: FeatureStats) -> Path:
    """Write `stats` to an .npz (features stored as float32 to halve the size)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"mu": stats.mu, "sigma": stats.sigma,
              "meta": np.array(json.dumps({"format": STATS_FORMAT, "n": stats.n,
                                           "extractor": stats.extractor, "key": stats.key}))}
    if stats.features is not None:
        arrays["features"] = stats.features.astype(np.float32)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    return path


def load_stats(path: str | os.PathLike) -> FeatureStats:
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        if meta.get("format") != STATS_FORMAT:
            raise ValueError(f"{path}: not an llcm feature-stats file")
        feats = z["features"].astype(np.float64) if "features" in z.files else None
        return FeatureStats(z["mu"].astype(np.float64), z["sigma"].astype(np.float64), int(meta["n"]),
                            meta["extractor"], meta.get("key", ""), feats)


def cached_stats(path: str | os.PathLike, extractor: str, key: str,
                 compute_features: Callable[[], np.ndarray], keep_features: bool = True) -> FeatureStats:
    """Load the statistics at `path` if they were made by `extractor` from `key`; else compute and save."""
    path = Path(path)
    if path.is_file():
        stats = load_stats(path)
        if stats.extractor == extractor and stats.key == key and (stats.features is not None or not keep_features):
            return stats
    stats = FeatureStats.from_features(compute_features(), extractor, key, keep_features)
    save_stats(path, stats)
    if stats.features is not None:  # return what a later load returns, so runs agree bit for bit
        stats = dataclasses.replace(stats, features=stats.features.astype(np.float32).astype(np.float64))
    return stats


def fingerprint(images_or_paths: np.ndarray | Sequence[str | os.PathLike]) -> str:
    """A cache key: SHA-1 of the pixels of an array, or of the (name, size) list of image files."""
    h = hashlib.sha1()
    if isinstance(images_or_paths, np.ndarray):
        h.update(str(images_or_paths.shape).encode())
        h.update(np.ascontiguousarray(images_or_paths).tobytes())
    else:
        for p in images_or_paths:
            p = Path(p)
            h.update(f"{p.as_posix()}\t{p.stat().st_size}\n".encode())
    return h.hexdigest()


def _features(x: Features) -> np.ndarray:
    if isinstance(x, FeatureStats):
        if x.features is None:
            raise ValueError("these statistics were saved without features; KID and precision/recall need them")
        return x.features
    return np.asarray(x, dtype=np.float64)


def _stats(x: Features) -> tuple[np.ndarray, np.ndarray]:
    return (x.mu, x.sigma) if isinstance(x, FeatureStats) else mean_cov(x)


def check_same_extractor(*named: Features) -> str | None:
    names = {x.extractor for x in named if isinstance(x, FeatureStats)}
    if len(names) > 1:
        raise ValueError(f"refusing to compare features from different extractors: {sorted(names)}")
    return names.pop() if names else None


# ----------------------------------------------------------------------------------------------
# Frechet distance / FID


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((sigma1 sigma2)^{1/2}) = sum_i sqrt(lambda_i(R^T sigma2 R)) for any R with R R^T = sigma1.

    sigma1 sigma2 is similar to the symmetric PSD matrix R^T sigma2 R, so one `eigvalsh` suffices, nothing
    imaginary appears and round-off negatives are clipped. R is the Cholesky factor when sigma1 is
    positive definite, else the symmetric square root from `eigh` (rank-deficient covariances).
    """
    try:
        r = np.linalg.cholesky(sigma1)
    except np.linalg.LinAlgError:
        w, v = np.linalg.eigh(sigma1)
        r = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    m = r.T @ sigma2 @ r
    lam = np.linalg.eigvalsh((m + m.T) / 2.0)
    return float(np.sqrt(np.clip(lam, 0.0, None)).sum())


def trace_sqrt_product_sqrtm(sigma1: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6) -> float:
    """pytorch-fid / clean-fid's route: scipy.linalg.sqrtm(sigma1 @ sigma2), with an eps*I offset if
    the product is singular and an error if the imaginary part is not round-off."""
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(sigma1)) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm has an imaginary component {np.max(np.abs(covmean.imag)):.3g}")
        covmean = covmean.real
    return float(np.trace(covmean))


# FD = ||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^{1/2})   (Dowson & Landau 1982; Heusel et al. 2017)
def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     method: str = "psd") -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), float64.

    method 'psd' (default): `trace_sqrt_product`, a symmetric PSD eigenproblem; 'sqrtm': scipy's
    matrix square root as in pytorch-fid / clean-fid (slower; kept for comparison).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
    tr_covmean = {"psd": trace_sqrt_product, "sqrtm": trace_sqrt_product_sqrtm}[method](sigma1, sigma2)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


# with sigma_i = A_i A_i^T (A_i = centered features^T / sqrt(n_i - 1)): tr((sigma1 sigma2)^{1/2}) = ||A1^T A2||_*
def frechet_distance_low_rank(x: np.ndarray, y: np.ndarray) -> float:
    """Frechet distance of two feature sets with fewer rows than dimensions, never forming a D x D matrix.

    The nonzero eigenvalues of sigma1 sigma2 are the squared singular values of A1^T A2 [n1, n2], so the
    trace term is that matrix's nuclear norm: exact, O(n1 n2 D), and free of rank-deficiency round-off.
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    a1 = (x - x.mean(axis=0)) / np.sqrt(len(x) - 1)
    a2 = (y - y.mean(axis=0)) / np.sqrt(len(y) - 1)
    tr_covmean = np.linalg.svd(a1 @ a2.T, compute_uv=False).sum()
    diff = x.mean(axis=0) - y.mean(axis=0)
    return float(diff @ diff + (a1 * a1).sum() + (a2 * a2).sum() - 2.0 * tr_covmean)


def fid(real: Features, fake: Features, method: str = "psd") -> float:
    """FID between two feature sets (arrays [N, D] or FeatureStats of the same extractor).

    Two arrays with fewer rows than dimensions (e.g. 500 images, 2048-d Inception) use the exact
    low-rank route; otherwise the D x D statistics go through `frechet_distance`.
    """
    check_same_extractor(real, fake)
    if not isinstance(real, FeatureStats) and not isinstance(fake, FeatureStats):
        x, y = np.asarray(real, np.float64), np.asarray(fake, np.float64)
        if max(len(x), len(y)) < x.shape[1]:
            return frechet_distance_low_rank(x, y)
    return frechet_distance(*_stats(real), *_stats(fake), method=method)


# ----------------------------------------------------------------------------------------------
# KID


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """k(x, y) = (x.y / d + 1)^3, the cubic kernel of Binkowski et al. 2018."""
    k = x @ y.T / x.shape[1] + 1.0
    return k * k * k


# MMD^2_u = 1/(m(m-1)) sum_{i!=j} [k(x_i,x_j) + k(y_i,y_j)] - 2/m^2 sum_{i,j} k(x_i,y_j)  (Gretton et al. 2012, eq. 3)
def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    m = len(x)
    if len(y) != m or m < 2:
        raise ValueError("mmd2_unbiased needs two sets of the same size >= 2")
    kxx, kyy, kxy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(within - 2.0 * kxy.sum() / (m * m))


def kid(real: Features, fake: Features, subset_size: int = 1000, n_subsets: int = 100,
        seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance: mean and std of MMD^2_u over `n_subsets` random subsets.

    Each subset draws m = min(subset_size, N_real, N_fake) rows of each set without replacement,
    as clean-fid and torch-fidelity do (torch-fidelity reports the same mean +- std).
    """
    check_same_extractor(real, fake)
    x_all, y_all = _features(real), _features(fake)
    m = min(subset_size, len(x_all), len(y_all))
    rng = np.random.default_rng(seed)
    vals = np.array([mmd2_unbiased(x_all[rng.choice(len(x_all), m, replace=False)],
                                   y_all[rng.choice(len(y_all), m, replace=False)])
                     for _ in range(n_subsets)])
    return float(vals.mean()), float(vals.std())


# ----------------------------------------------------------------------------------------------
# Precision / recall (Kynkaanniemi et al. 2019), density / coverage (Naeem et al. 2020)


def pairwise_sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """||a_i - b_j||^2, float64 [len(a), len(b)] (clipped at 0 against round-off)."""
    sq = (a * a).sum(axis=1)[:, None] + (b * b).sum(axis=1)[None, :] - 2.0 * a @ b.T
    return np.maximum(sq, 0.0)


def knn_radii(feats: np.ndarray, k: int, chunk: int = 1024) -> np.ndarray:
    """Distance from each row to its k-th nearest OTHER row (the k-NN ball radius)."""
    feats = np.asarray(feats, dtype=np.float64)
    if len(feats) <= k:
        raise ValueError(f"need more than k={k} samples for k-NN radii, got {len(feats)}")
    out = np.empty(len(feats))
    for i in range(0, len(feats), chunk):
        d = pairwise_sq_dists(feats[i:i + chunk], feats)
        rows = np.arange(len(d))
        d[rows, i + rows] = np.inf  # exclude the point itself
        out[i:i + chunk] = np.sqrt(np.partition(d, k - 1, axis=1)[:, k - 1])
    return out


def precision_recall(real: Features, fake: Features, k: int = 3, chunk: int = 1024) -> dict[str, float]:
    """Improved precision/recall with k-NN manifolds, plus density and coverage from the same balls.

    precision = share of fake samples inside some real k-NN ball; recall = share of real samples
    inside some fake k-NN ball (Kynkaanniemi et al. 2019); density = mean number of real balls that
    contain a fake sample, / k; coverage = share of real balls that contain some fake sample
    (Naeem et al. 2020). Memory is O(chunk * N), never N^2.
    """
    check_same_extractor(real, fake)
    x, y = _features(real), _features(fake)
    rx, ry = knn_radii(x, k, chunk), knn_radii(y, k, chunk)
    n_precise, n_balls = 0, 0
    recalled = np.zeros(len(x), dtype=bool)
    covered = np.zeros(len(x), dtype=bool)
    for j in range(0, len(y), chunk):
        d = np.sqrt(pairwise_sq_dists(y[j:j + chunk], x))  # [chunk of fake, N_real]
        inside_real = d <= rx[None, :]  # fake j inside real ball i
        n_precise += int(inside_real.any(axis=1).sum())
        n_balls += int(inside_real.sum())
        covered |= inside_real.any(axis=0)
        recalled |= (d <= ry[j:j + chunk, None]).any(axis=0)  # real i inside fake ball j
    return {
        "precision": n_precise / len(y),
        "recall": float(recalled.mean()),
        "density": n_balls / (k * len(y)),
        "coverage": float(covered.mean()),
    }


# ----------------------------------------------------------------------------------------------
# Everything at once


def compute_all(real: Features, fake: Features, extractor: str | None = None, k: int = 3,
                kid_subset_size: int = 1000, kid_subsets: int = 100, seed: int = 0,
                max_pr_samples: int | None = 10000) -> dict:
    """FID, KID (mean, std), precision/recall/density/coverage and the sample counts.

    `extractor` names the features (taken from FeatureStats when given); it is put in the result so
    that tables never show unnamed or mixed numbers. Precision/recall subsample each set to
    `max_pr_samples` rows (seeded) because they need all pairwise distances.
    """
    named = check_same_extractor(real, fake)
    if extractor is not None and named is not None and extractor != named:
        raise ValueError(f"extractor {extractor!r} given but the statistics say {named!r}")
    x, y = _features(real), _features(fake)
    rng = np.random.default_rng(seed)

    def cap(f: np.ndarray) -> np.ndarray:
        if max_pr_samples is None or len(f) <= max_pr_samples:
            return f
        return f[np.sort(rng.choice(len(f), max_pr_samples, replace=False))]

    px, py = cap(x), cap(y)
    kid_mean, kid_std = kid(x, y, kid_subset_size, kid_subsets, seed)
    return {
        "extractor": extractor or named,
        "n_real": len(x),
        "n_fake": len(y),
        "fid": fid(real, fake),
        "kid_mean": kid_mean,
        "kid_std": kid_std,
        **precision_recall(px, py, k),
        "k": k,
    }
