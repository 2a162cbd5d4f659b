"""Images -> VAE latents, computed once and cached as a :class:`llcm.latents.LatentSet`.

Latents are the VAE posterior *means* (deterministic: the same images and VAE always give the same
cache, and the scaling factor of `llcm train vae` is measured on exactly these), multiplied by the
VAE's scaling factor. Horizontal flips are only added with ``flip=True``: in medical images
left/right is anatomy (heart on the left, laterality markers), so a flipped image is a different,
usually wrong, anatomy.

A cache remembers the VAE hash, the scaling factor, a hash of the data (metadata rows + file bytes),
the split and the flip flag. Encoding again with all of them equal (and the cache file unchanged: its
sha256 is recorded) does nothing; with any of them different it is refused unless ``overwrite=True``, so
stale latents are never reused silently; a damaged cache is refused too, and ``overwrite=True`` encodes it
again.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from llcm.errors import UserError
from llcm.fileio import record_name
from llcm.images import channel_spread, grayscale_classes
from llcm.latents import LatentSet
from llcm.training import writable_folder
from llcm.vae import (ImageSplit, find_vae_folder, load_pixels, load_vae, scan_split, to_model_range, vae_factor,
                      vae_hash)

Tensor = torch.Tensor
KEYS = ("vae_hash", "scaling_factor", "data_hash", "split", "flip")


def _stale(meta: dict, want: dict) -> list[str]:
    return [f"{k} {meta.get(k)!r} != {want[k]!r}" for k in KEYS if meta.get(k) != want[k]]


def encode_split(data_dir: str | os.PathLike, model: str | os.PathLike, out: str | os.PathLike,
                 split: str = "train", flip: bool = False, overwrite: bool = False, batch_size: int = 16,
                 progress: bool = True, device: str | torch.device | None = None) -> tuple[LatentSet, dict]:
    """Encode one split of an imagefolder dataset with the VAE in ``model``; returns (latents, info).

    ``model`` is a full model folder (with ``vae/``), a `llcm train vae` run or model folder, a bare
    AutoencoderKL folder, an adapter folder (its base's VAE), "default" or a Hugging Face id in the local cache
    (:func:`llcm.pipeline.resolve_model`). ``info["skipped"]`` is True when an up-to-date cache was reused.
    """
    from tqdm.auto import tqdm

    from llcm.adapter import full_model_folder
    from llcm.pipeline import model_record, resolve_model

    if batch_size < 1:
        raise UserError(f"batch size must be >= 1, got {batch_size}")
    vae_dir = find_vae_folder(full_model_folder(resolve_model(model)))  # an adapter has no VAE of its own
    vae = load_vae(vae_dir)
    scale = float(vae.config.scaling_factor)
    images: ImageSplit = scan_split(data_dir, split, vae_factor(vae))
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} is a file, not a folder")
    want = {"vae_hash": vae_hash(vae), "scaling_factor": scale, "data_hash": images.data_hash, "split": split,
            "flip": bool(flip)}
    cached = out / "latents.json"
    if cached.is_file():
        try:
            meta = json.loads(cached.read_text(encoding="utf-8"))
            diff = _stale(meta, want)
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            meta, diff = {}, [f"{cached.name} is damaged"]
        # up to date: the same settings and an intact file (LatentSet.load checks its recorded sha256); a cache
        # from before llcm recorded grayscale classes is encoded again (the same latents, plus that)
        if not diff and "grayscale" in meta and (out / "latents.safetensors").is_file():
            try:
                return LatentSet.load(out, expect_vae_hash=want["vae_hash"]), {"skipped": True, **want}
            except UserError:
                if not overwrite:
                    raise
        elif diff and not overwrite:
            raise UserError(f"{out} holds latents made differently ({'; '.join(diff)}); "
                            "pass --overwrite to replace them or choose another --out")
    writable_folder(out)

    t0 = time.perf_counter()
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vae.to(dev)
    dtype = next(vae.parameters()).dtype
    chunks, spreads = [], []
    with torch.no_grad():
        for i in tqdm(range(0, len(images), batch_size), desc=f"encode {split}", disable=not progress,
                      dynamic_ncols=True):
            pixels = load_pixels(images, range(i, min(i + batch_size, len(images))))
            spreads.append(channel_spread(pixels.numpy()))
            x = to_model_range(pixels).to(dev, dtype)
            z = vae.encode(x).latent_dist.mean
            z_flip = vae.encode(torch.flip(x, dims=[-1])).latent_dist.mean if flip else None
            chunks.append((z.float().cpu(), None if z_flip is None else z_flip.float().cpu()))
    latents = torch.cat([c[0] for c in chunks])
    if flip:  # the flipped copies follow the originals, in the same order
        latents = torch.cat([latents, torch.cat([c[1] for c in chunks])])
    latents = latents * scale

    prompts = list(dict.fromkeys(images.texts))
    row = {p: i for i, p in enumerate(prompts)}
    index = torch.tensor([row[t] for t in images.texts], dtype=torch.long)
    if flip:
        index = torch.cat([index, index])
    first_class = {}
    for t, c in zip(images.texts, images.classes):
        first_class.setdefault(t, c)
    from llcm import __version__

    # provenance by name (data_hash and vae_hash identify them), never a path of this machine
    meta = {**want, "source": record_name(data_dir), "vae_source": model_record(model),
            "classes": [first_class[p] for p in prompts], "image_size": [images.height, images.width],
            "vae_factor": vae_factor(vae), "encoding": "posterior mean x scaling_factor",
            "grayscale": grayscale_classes(np.concatenate(spreads), list(images.texts)),
            "layout": "N originals, then their N flipped copies in the same order" if flip else "N originals",
            "images": len(images), "llcm_version": __version__}
    result = LatentSet(latents, index, prompts, meta)
    result.save(out)
    info = {"skipped": False, **want, "seconds": round(time.perf_counter() - t0, 3),
            "std": float(latents.std()), "mean": float(latents.mean())}
    return result, info
