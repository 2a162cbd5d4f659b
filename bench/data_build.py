"""Throughput of `llcm data build` on 512x512 JPEG inputs, and how it scales with processes.

    PYTHONPATH=src python bench/data_build.py [--images 2000] [--workers 1 2 4] [--size 512]

Writes N distinct 512x512 JPEGs (quality 90) into 6 class folders of a temporary source tree, then
builds it (decode, validate, hash, perceptual hash, resize, JPEG-95 encode, dedupe, split, write)
once per worker count into a fresh output folder. Images/s counts every image that went in,
over the whole build's wall time (process start-up included). Target: >= 100 images/s with 2
processes at 512 px on a 2-core machine. The machine's load average is printed: other work on
the machine makes every number lower, so the CPU time per image of the 1-process run (which does
not depend on how busy the machine is) is printed too.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def make_inputs(root: Path, n: int, size: int = 512, seed: int = 0) -> None:
    """Distinct pictures as JPEG quality 90: 40 smooth random fields at a few scales, each rolled
    by a random offset, possibly flipped, with fresh noise (a different picture every time)."""
    rng = np.random.default_rng(seed)
    bases = []
    for _ in range(min(n, 40)):
        img = np.zeros((size, size), np.float32)
        for grid in (4, 16, 64):
            coarse = Image.fromarray((rng.random((grid, grid)) * 255).astype(np.uint8))
            img += np.asarray(coarse.resize((size, size), Image.Resampling.BICUBIC), np.float32) / grid**0.5
        bases.append(img / img.max() * 230)
    for i in range(n):
        img = np.roll(bases[i % len(bases)], tuple(rng.integers(0, size, 2)), axis=(0, 1))
        if rng.uniform() < 0.5:
            img = img[:, ::-1]
        img = img + rng.normal(0, 4, (size, size)).astype(np.float32)
        folder = root / "bench" / f"class{i % 6}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"{i:05d}.jpg", quality=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--size", type=int, default=512, help="output size (shorter side)")
    parser.add_argument("--repeat", type=int, default=1, help="builds per worker count (best is reported)")
    args = parser.parse_args()

    from llcm.data import build_dataset

    tmp = Path(tempfile.mkdtemp(prefix="llcm-bench-"))
    try:
        t0 = time.perf_counter()
        make_inputs(tmp / "src", args.images)
        print(f"inputs: {args.images} JPEGs 512x512 in {time.perf_counter() - t0:.1f} s; cpus available: "
              f"{len(os.sched_getaffinity(0))}; load average: {os.getloadavg()[0]:.2f}")
        print(f"{'processes':>9} | {'seconds':>8} | {'images/s':>8} | speed-up")
        print("-" * 44)
        base = None
        cpu_per_image = float("inf")
        for w in args.workers:
            best = float("inf")
            for r in range(args.repeat):
                out = tmp / f"out-{w}-{r}"
                t, c = time.perf_counter(), time.process_time()
                stats = build_dataset([str(tmp / "src")], out, size=args.size, workers=w, progress=False, cap=0)
                best = min(best, time.perf_counter() - t)
                if w == 1:  # inline: this process did all the work, so its CPU time is the cost
                    cpu_per_image = min(cpu_per_image, (time.process_time() - c) / args.images)
                assert stats["totals"]["images"] + stats["totals"]["rejected"] == args.images
                dups = stats["rejections"].get("near_duplicate", 0) + stats["rejections"].get("exact_duplicate", 0)
                shutil.rmtree(out)
            rate = args.images / best
            base = base or rate
            print(f"{w:>9} | {best:>8.2f} | {rate:>8.1f} | {rate / base:.2f}x   ({dups} duplicates found)")
        print(f"load average after: {os.getloadavg()[0]:.2f}")
        if cpu_per_image < float("inf"):
            print(f"CPU time per image (1 process): {cpu_per_image * 1000:.2f} ms, i.e. {1 / cpu_per_image:.0f} "
                  f"images/s per fully available core ({2 / cpu_per_image:.0f} on 2 idle cores, before start-up)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
