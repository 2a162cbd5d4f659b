"""Images -> VAE latents, computed once and cached as a :class:`llcm.latents.LatentSet` (sharded, format 2).

Latents are the VAE posterior *means* (deterministic: the same images and VAE always give the same
cache, and the scaling factor of `llcm train vae` is measured on exactly these), multiplied by the
VAE's scaling factor, stored as float16 by default (``dtype``: fp32, fp16 or bf16) in shards of
``shard_mb`` MB. Horizontal flips are only added with ``flip=True``: in medical images left/right is
anatomy (heart on the left, laterality markers), so a flipped image is a different, usually wrong, anatomy.

A cache remembers the VAE hash, the scaling factor, a hash of the data (metadata rows + file bytes),
the split, the flip flag and the dtype. Encoding again with all of them equal (and every shard intact:
their sha256 is checked) does nothing; with any of them different it is refused unless ``overwrite=True``,
so stale latents are never reused silently; a damaged cache is refused too, and ``overwrite=True`` encodes
it again. A format-1 cache (one latents.safetensors) with the same settings is encoded again as shards.

Processes. Under `torchrun` / `accelerate launch` every process encodes a contiguous run of the shards (so
of the images) and writes them; once all exist, the main process writes latents.json. A shard's bytes
depend only on its rows (the encoder batches are cut within the shard), so N processes write the same
cache as one. An interrupted run keeps the shards it finished: the next run (same settings, without
``overwrite``) encodes only the missing ones.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from llcm.errors import UserError
from llcm.fileio import record_name
from llcm.images import channel_spread, grayscale_classes
from llcm.latents import (DTYPE_NAME, LEGACY_FILE, SHARD_FILE, SHARD_MB, SHARD_PATTERN, LatentSet, shard_info,
                          shard_rows, storage_dtype, write_index, write_shard)
from llcm.training import writable_folder
from llcm.vae import (ImageSplit, find_vae_folder, load_pixels, load_vae, scan_split, to_model_range, vae_factor,
                      vae_hash)

Tensor = torch.Tensor
KEYS = ("vae_hash", "scaling_factor", "data_hash", "split", "flip")


def _stale(meta: dict, want: dict, keys: tuple[str, ...] = KEYS) -> list[str]:
    return [f"{k} {meta.get(k)!r} != {want[k]!r}" for k in keys if meta.get(k) != want[k]]


@dataclass
class EncodeJob:
    """One `llcm encode`: the checked inputs and the shard plan, the same in every process."""

    vae: object
    images: ImageSplit
    out: Path
    want: dict  # KEYS + dtype: what makes a cache this one
    dtype: torch.dtype
    shape: tuple[int, int, int]  # [C, h, w] of one latent
    ranges: list[tuple[int, int]]  # rows [a, b) of each shard
    plan: str  # digest of want, shape and ranges: a shard of another plan is encoded again
    batch_size: int
    source: str
    vae_source: str

    @property
    def rows(self) -> int:
        return self.ranges[-1][1]

    def prompt_index(self) -> tuple[list[str], Tensor]:
        prompts = list(dict.fromkeys(self.images.texts))
        row = {p: i for i, p in enumerate(prompts)}
        index = torch.tensor([row[t] for t in self.images.texts], dtype=torch.long)
        return prompts, torch.cat([index, index]) if self.want["flip"] else index


def plan_encode(data_dir: str | os.PathLike, model: str | os.PathLike, out: str | os.PathLike, split: str = "train",
                flip: bool = False, batch_size: int = 16, dtype: str = "fp16",
                shard_mb: float | None = None) -> EncodeJob:
    """Load the VAE, check and hash the split, and cut the cache into shards (reads, writes nothing)."""
    if batch_size < 1:
        raise UserError(f"batch size must be >= 1, got {batch_size}")
    stored = storage_dtype(dtype)
    from llcm.adapter import full_model_folder
    from llcm.pipeline import resolve_model

    vae = load_vae(find_vae_folder(full_model_folder(resolve_model(model))))  # an adapter has no VAE of its own
    images = scan_split(data_dir, split, vae_factor(vae))
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} is a file, not a folder")
    f = vae_factor(vae)
    shape = (int(vae.config.latent_channels), images.height // f, images.width // f)
    rows = len(images) * (2 if flip else 1)
    ranges = shard_rows(rows, shape, stored, SHARD_MB if shard_mb is None else shard_mb)
    want = {"vae_hash": vae_hash(vae), "scaling_factor": float(vae.config.scaling_factor),
            "data_hash": images.data_hash, "split": split, "flip": bool(flip), "dtype": DTYPE_NAME[stored]}
    plan = hashlib.sha256(json.dumps([want, shape, ranges]).encode()).hexdigest()[:16]
    from llcm.pipeline import model_record

    return EncodeJob(vae, images, out, want, stored, shape, ranges, plan, batch_size, record_name(data_dir),
                     model_record(model))


def cached(job: EncodeJob, overwrite: bool) -> LatentSet | None:
    """The cache in job.out when it is up to date (every shard hashed), else None when it may be (re)written;
    a cache made differently, or a damaged one, is refused unless `overwrite`. Reads only."""
    index = job.out / "latents.json"
    if not index.is_file():
        return None
    try:
        meta = json.loads(index.read_text(encoding="utf-8"))
        sharded = "shards" in meta
        diff = _stale(meta, job.want, KEYS + (("dtype",) if sharded else ()))
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError, TypeError):
        meta, sharded, diff = {}, False, [f"{index.name} is damaged"]
    if diff:
        if overwrite:
            return None
        raise UserError(f"{job.out} holds latents made differently ({'; '.join(diff)}); "
                        "pass --overwrite to replace them or choose another --out")
    # the same settings: a format-1 cache, or one from before llcm recorded grayscale classes, is encoded again
    if not sharded or "grayscale" not in meta:
        return None
    try:
        return LatentSet.load(job.out, expect_vae_hash=job.want["vae_hash"], verify="all")
    except UserError:
        if not overwrite:
            raise
        return None


def prepare_out(job: EncodeJob, overwrite: bool) -> None:
    """Main process, before any shard is written: the folder exists and is writable; latents.json (and with
    `overwrite` every shard) goes, so a cache is never half old, half new."""
    writable_folder(job.out)
    (job.out / "latents.json").unlink(missing_ok=True)
    if overwrite:
        for p in job.out.iterdir():
            if SHARD_PATTERN.fullmatch(p.name) or p.name == LEGACY_FILE:
                p.unlink()


def _done(path: Path, info: dict) -> bool:
    """A shard of this plan written by an earlier (interrupted) run: kept."""
    try:
        return path.is_file() and shard_info(path) == info
    except Exception:  # noqa: BLE001  (an unreadable header: encoded again)
        return False


def _shard_info(job: EncodeJob, a: int, b: int) -> dict:
    return {"rows": [a, b], "count": job.rows, "vae_hash": job.want["vae_hash"], "plan": job.plan}


@torch.no_grad()
def encode_shards(job: EncodeJob, rank: int = 0, world: int = 1, device: str | torch.device = "cpu",
                  progress: bool = False) -> list[int]:
    """Encode and write this process's shards (a contiguous run of them); returns the shards written (the
    shards an earlier run finished are kept). Row r < n is image r, row n + r its horizontal flip."""
    from tqdm.auto import tqdm

    n, s = len(job.images), len(job.ranges)
    mine = range(rank * s // world, (rank + 1) * s // world)
    todo = [i for i in mine if not _done(job.out / SHARD_FILE.format(i), _shard_info(job, *job.ranges[i]))]
    vae = job.vae.to(device)
    model_dtype = next(vae.parameters()).dtype
    scale = job.want["scaling_factor"]
    _, index = job.prompt_index()
    bar = tqdm(total=sum(job.ranges[i][1] - job.ranges[i][0] for i in todo), desc=f"encode {job.want['split']}",
               disable=not progress, dynamic_ncols=True)
    for i in todo:
        a, b = job.ranges[i]
        chunks, spreads = [], []
        for r0 in range(a, b, job.batch_size):  # batches cut within the shard: the same in any process
            rows = range(r0, min(r0 + job.batch_size, b))
            pixels = load_pixels(job.images, [r % n for r in rows])
            spreads.append(torch.from_numpy(channel_spread(pixels.numpy())))
            x = to_model_range(pixels)
            flipped = torch.tensor([r >= n for r in rows])
            x[flipped] = torch.flip(x[flipped], dims=[-1])
            z = vae.encode(x.to(device, model_dtype)).latent_dist.mean.float().cpu()
            if tuple(z.shape[1:]) != job.shape:
                raise UserError(f"the VAE gives latents {list(z.shape[1:])}, not the expected {list(job.shape)}")
            chunks.append(z * scale)
            bar.update(len(rows))
        write_shard(job.out, i, torch.cat(chunks), index[a:b], job.dtype, _shard_info(job, a, b),
                    extra={"channel_spread": torch.cat(spreads).double()})
    bar.close()
    return todo


def finish_encode(job: EncodeJob) -> dict:
    """Main process, once every shard exists: check them, find the grayscale classes, write latents.json."""
    from llcm import __version__
    from safetensors import safe_open

    spreads = []
    for i, (a, b) in enumerate(job.ranges):
        path = job.out / SHARD_FILE.format(i)
        if not _done(path, _shard_info(job, a, b)):
            raise UserError(f"{path} is missing or was not written by this encoding (did a process fail?); "
                            "run `llcm encode` again")
        with safe_open(str(path), "pt") as f:
            spreads.append(f.get_tensor("channel_spread"))
    n = len(job.images)
    prompts, _ = job.prompt_index()
    first_class = {}
    for t, c in zip(job.images.texts, job.images.classes):
        first_class.setdefault(t, c)
    # provenance by name (data_hash and vae_hash identify them), never a path of this machine
    meta = {**job.want, "source": job.source, "vae_source": job.vae_source,
            "classes": [first_class[p] for p in prompts], "image_size": [job.images.height, job.images.width],
            "vae_factor": vae_factor(job.vae), "encoding": "posterior mean x scaling_factor",
            "grayscale": grayscale_classes(torch.cat(spreads)[:n].numpy(), list(job.images.texts)),
            "layout": "N originals, then their N flipped copies in the same order" if job.want["flip"]
            else "N originals", "images": n, "llcm_version": __version__}
    return write_index(job.out, job.ranges, job.dtype, job.shape, prompts, meta)


def _stats(latents) -> dict:
    """Mean and std of every latent value, streamed over the shards."""
    total, total_sq, count = 0.0, 0.0, 0
    for chunk in latents.chunks():
        c = chunk.double()
        total, total_sq, count = total + float(c.sum()), total_sq + float((c * c).sum()), count + c.numel()
    mean = total / count
    return {"mean": mean, "std": float(np.sqrt(max(total_sq - count * mean * mean, 0.0) / max(count - 1, 1)))}


def encode_split(data_dir: str | os.PathLike, model: str | os.PathLike, out: str | os.PathLike,
                 split: str = "train", flip: bool = False, overwrite: bool = False, batch_size: int = 16,
                 progress: bool = True, device: str | torch.device | None = None, dtype: str = "fp16",
                 shard_mb: float | None = None) -> tuple[LatentSet, dict]:
    """Encode one split of an imagefolder dataset with the VAE in ``model``; returns (latents, info).

    ``model`` is a full model folder (with ``vae/``), a `llcm train vae` run or model folder, a bare
    AutoencoderKL folder, an adapter folder (its base's VAE), "default" or a Hugging Face id in the local cache
    (:func:`llcm.pipeline.resolve_model`). ``info["skipped"]`` is True when an up-to-date cache was reused; ``info["main"]``
    is False in the other processes of a multi-process run."""
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    job = plan_encode(data_dir, model, out, split, flip, batch_size, dtype, shard_mb)
    base = {**job.want, "main": state.is_main_process, "processes": state.num_processes, "shards": len(job.ranges)}
    up_to_date = cached(job, overwrite)  # every process decides alike, before the main one changes anything
    state.wait_for_everyone()
    if up_to_date is not None:
        return up_to_date, {"skipped": True, **base}
    t0 = time.perf_counter()
    if state.is_main_process:
        prepare_out(job, overwrite)
    state.wait_for_everyone()
    written = encode_shards(job, state.process_index, state.num_processes, device or state.device,
                            progress and state.is_main_process)
    state.wait_for_everyone()
    if state.is_main_process:
        finish_encode(job)
    state.wait_for_everyone()
    result = LatentSet.load(job.out, expect_vae_hash=job.want["vae_hash"])
    info = {"skipped": False, **base, "seconds": round(time.perf_counter() - t0, 3), "written": len(written)}
    if state.is_main_process:
        info.update(_stats(result.latents))
    return result, info
