"""A latent cache at the paper's scale: 250k SD latents (4x64x64) stored as fp16 shards (~8 GB on disk).

1. writes the cache shard by shard (random latents, through llcm.latents' own writer: shard_rows, write_shard,
   write_index), then drops the shards from the page cache (fsync + posix_fadvise DONTNEED), so reads start cold;
2. one reader (a fresh process, as one training process): LatentSet.load, the first batch (it checks the sha256 of
   every shard it touches: nearly all of them), then `--batches` random batches of `--batch` (the training loop's
   batch_indices); prints `rss_gb <peak RSS>` (resource.getrusage) and the read rate;
3. the same cold (page cache dropped again, verify="header": the sha256 were checked in 2), to see the disk;
4. `--readers` processes at once, as `--readers` training processes of one node: every process draws the global
   batch of readers x batch rows and reads only its slice (llcm.latents.read_rows, what the tasks' draw does).
The cache is deleted at the end unless --keep. Needs --dir on a disk with ~9 GB free.

Run: python bench/latents_scale.py --dir /tmp/llcm-scale     (about 5 minutes on 2 CPU cores)
     python bench/latents_scale.py --dir /tmp/s --count 20000   (a quick look)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import shutil
import time
from pathlib import Path

SHAPE = (4, 64, 64)  # Stable Diffusion's latents of 512 px images
PROMPTS = [f"class {i}" for i in range(8)]


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux: KB


def drop_page_cache(folder: Path) -> None:
    """Evict the shards' pages from the page cache (no root needed: clean pages of our own files)."""
    for p in folder.glob("latents-*.safetensors"):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def write_cache(folder: str, count: int, shard_mb: float, seed: int) -> dict:
    import torch

    from llcm.latents import shard_rows, write_index, write_shard

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ranges = shard_rows(count, SHAPE, torch.float16, shard_mb)
    g = torch.Generator().manual_seed(seed)
    for i, (a, b) in enumerate(ranges):
        lat = torch.randn((b - a, *SHAPE), generator=g, dtype=torch.float16)
        index = torch.randint(len(PROMPTS), (b - a,), generator=g)
        write_shard(folder, i, lat, index, torch.float16, {"rows": [a, b], "count": count,
                                                            "vae_hash": "bench-random", "plan": None})
    written = time.perf_counter() - t0
    write_index(folder, ranges, torch.float16, SHAPE, PROMPTS, {"vae_hash": "bench-random",
                                                               "source": "bench/latents_scale.py (random)"})
    total = time.perf_counter() - t0
    drop_page_cache(folder)
    size = sum(p.stat().st_size for p in folder.glob("latents-*.safetensors"))
    return {"shards": len(ranges), "disk_gb": size / 1e9, "write_s": written, "write_and_hash_s": total,
            "rss_gb": peak_rss_gb()}


def read(folder: str, batches: int, batch: int, readers: int, rank: int, verify: str, seed: int) -> dict:
    """One training process's reads: the global batch of readers x batch rows, its slice only."""
    import torch

    from llcm.latents import LatentSet, read_rows
    from llcm.training import batch_indices

    idle = peak_rss_gb()  # torch and llcm imported, nothing read
    t0 = time.perf_counter()
    data = LatentSet.load(folder, verify=verify)
    t_load = time.perf_counter() - t0
    n, width = len(data), readers * batch
    keep = slice(rank * batch, (rank + 1) * batch)
    row_mb = torch.tensor([], dtype=data.latents.stored_dtype).element_size() * data.latents.shape[1:].numel() / 1e6

    def one(step: int) -> torch.Tensor:
        idx = batch_indices(n, width, step, seed)
        return read_rows(data.latents, idx, keep)[keep]

    t0 = time.perf_counter()
    z = one(0)
    t_first = time.perf_counter() - t0
    assert z.shape == (batch, *SHAPE) and z.dtype == torch.float32
    t0 = time.perf_counter()
    for step in range(1, batches + 1):
        one(step)
    t = time.perf_counter() - t0
    return {"rank": rank, "load_s": t_load, "first_batch_s": t_first, "shards_hashed": len(data.latents.verified),
            "batches_per_s": batches / t, "rows_per_s": batches * batch / t,
            "mb_per_s_stored": batches * batch * row_mb / t, "mb_per_s_float32": batches * batch * row_mb * 2 / t
            if data.latents.stored_dtype == torch.float16 else None,
            "idle_rss_gb": idle, "rss_gb": peak_rss_gb()}


def in_child(fn, *args):
    """Run fn(*args) in a fresh process (its own peak RSS)."""
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", required=True, help="folder for the cache (deleted at the end unless --keep)")
    ap.add_argument("--count", type=int, default=250_000)
    ap.add_argument("--shard-mb", type=float, default=None, help="default llcm.latents.SHARD_MB")
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--batch", type=int, default=64, help="rows per process and batch")
    ap.add_argument("--readers", type=int, default=8)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    from llcm.latents import SHARD_MB

    folder = Path(args.dir)
    if folder.exists() and any(folder.iterdir()):
        raise SystemExit(f"{folder} is not empty")
    try:
        w = in_child(write_cache, str(folder), args.count, args.shard_mb or SHARD_MB, 0)
        print(f"wrote {args.count} latents {'x'.join(map(str, SHAPE))} fp16: {w['shards']} shards, "
              f"{w['disk_gb']:.2f} GB in {w['write_s']:.1f} s (+ sha256 and latents.json: "
              f"{w['write_and_hash_s']:.1f} s in all), writer peak RSS {w['rss_gb']:.2f} GB")
        one = in_child(read, str(folder), args.batches, args.batch, 1, 0, "lazy", 0)
        print(json.dumps({"one_reader": one}))
        print(f"one reader: load {one['load_s']:.2f} s; first batch {one['first_batch_s']:.1f} s (sha256 of the "
              f"{one['shards_hashed']} shards it touched); then {one['batches_per_s']:.0f} batches/s of {args.batch}, "
              f"{one['mb_per_s_stored']:.0f} MB/s read (fp16)")
        print(f"rss_gb {one['rss_gb']:.2f}")
        drop_page_cache(folder)
        cold = in_child(read, str(folder), args.batches, args.batch, 1, 0, "header", 1)
        print(json.dumps({"one_reader_cold": cold}))
        print(f"one reader, cold page cache, no sha256: {cold['batches_per_s']:.0f} batches/s, "
              f"{cold['mb_per_s_stored']:.0f} MB/s; rss_gb {cold['rss_gb']:.2f}")
        with mp.get_context("spawn").Pool(args.readers) as pool:
            t0 = time.perf_counter()
            many = pool.starmap(read, [(str(folder), args.batches, args.batch, args.readers, r, "lazy", 2)
                                       for r in range(args.readers)])
            wall = time.perf_counter() - t0
        print(json.dumps({"readers": many}))
        rows = args.readers * args.batches * args.batch
        print(f"{args.readers} readers at once (global batch {args.readers * args.batch}, each reads its "
              f"{args.batch} rows): peak RSS per process max {max(m['rss_gb'] for m in many):.2f} GB (idle "
              f"{max(m['idle_rss_gb'] for m in many):.2f}); first batch (sha256 of the shards touched) "
              f"{max(m['first_batch_s'] for m in many):.1f} s; then per process "
              f"{min(m['batches_per_s'] for m in many):.0f}-{max(m['batches_per_s'] for m in many):.0f} batches/s; "
              f"summed {sum(m['rows_per_s'] for m in many):.0f} rows/s, "
              f"{sum(m['mb_per_s_stored'] for m in many):.0f} MB/s; {rows} rows in {wall:.0f} s wall (incl. "
              "start-up, sha256)")
        print(f"rss_gb_per_reader {max(m['rss_gb'] for m in many):.2f}")
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
