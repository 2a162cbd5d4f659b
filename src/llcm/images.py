"""Image helpers shared by generation, training, evaluation and the benches: the grid, the one writer of PNGs
that record how they were made, the colour mode of a class, luminance.

Most medical modalities are grayscale, while the VAE (like Stable Diffusion's) is RGB: a sample that lies
slightly off the latents of real images decodes with a colour cast that no grayscale image has. A class
whose training images are grayscale is therefore recorded as such (llcm.json "grayscale"), and its
samples are returned as their luminance, repeated on the three channels.
"""

from __future__ import annotations

import json
import math
import os
import secrets
from pathlib import Path

import numpy as np

from llcm.errors import UserError

GRAY_SPREAD = 2.0  # an image is grayscale when its channels differ by < 2 grey levels on average
GRAY_SHARE = 0.8  # a class is grayscale when at least this share of its images is
LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, as PIL's convert("L")


def channel_spread(pixels) -> np.ndarray:
    """Mean (max - min) over the colour channels per image, in grey levels: uint8 [N, 3, H, W] -> [N]."""
    a = np.asarray(pixels).astype(np.int16)
    return (a.max(1) - a.min(1)).reshape(len(a), -1).mean(1)


def grayscale_classes(spreads: np.ndarray, labels: list[str]) -> list[str]:
    """The labels whose images are mostly grayscale (share >= GRAY_SHARE with spread < GRAY_SPREAD)."""
    spreads, labels = np.asarray(spreads), np.asarray(labels)
    return [c for c in dict.fromkeys(labels.tolist())
            if float((spreads[labels == c] < GRAY_SPREAD).mean()) >= GRAY_SHARE]


def luminance_rgb(images: np.ndarray) -> np.ndarray:
    """[..., 3] RGB (float in [0, 1] or uint8) -> its luminance on all three channels, same dtype."""
    a = np.asarray(images)
    y = a.astype(np.float32) @ np.asarray(LUMA, dtype=np.float32)
    if a.dtype == np.uint8:
        y = np.clip(np.round(y), 0, 255)
    return np.repeat(y[..., None], 3, axis=-1).astype(a.dtype)


def write_images(result, out: Path, model_name: str, overwrite: bool = False) -> list[Path]:
    """One PNG per image of a Generation (prompt, seed, steps, w, timesteps, model hash in its text chunks),
    plus grid.png and generation.json. An existing file (or link) of any of these names is refused unless
    overwrite. Every file is written to a new temporary file in `out` and renamed over its name, so a link
    placed there is replaced, never followed out of `out`."""
    from PIL.PngImagePlugin import PngInfo

    from llcm import __version__

    out.mkdir(parents=True, exist_ok=True)
    names = [out / f"{i:03d}_seed{s}.png" for i, s in enumerate(result.seeds)]
    if not overwrite:
        clash = [p for p in names + [out / "grid.png", out / "generation.json"] if os.path.lexists(p)]
        if clash:
            raise UserError(f"{clash[0]} already exists; use another --out or pass --overwrite")
    records = []
    images = result.pil_images()
    for path, img, prompt, seed in zip(names, images, result.prompts, result.seeds):
        meta = {"prompt": prompt, "seed": seed, "steps": result.steps, "w": result.w,
                "timesteps": result.timesteps, "model": model_name, "model_hash": result.model_hash,
                "software": f"llcm {__version__}"}
        info = PngInfo()
        for k, v in meta.items():
            info.add_text(f"llcm:{k}", json.dumps(v) if not isinstance(v, str) else v)
        info.add_text("parameters", json.dumps(meta))
        _replace(path, lambda f, img=img, info=info: img.save(f, format="PNG", pnginfo=info))
        records.append({"file": path.name, **meta})
    _replace(out / "grid.png", lambda f: make_grid(images).save(f, format="PNG"))
    _replace(out / "generation.json", lambda f: f.write(json.dumps(records, indent=2).encode()))
    return names


def _replace(path: Path, write) -> None:
    """write(file) into a new temporary file beside `path` (created exclusively: never an existing file or
    link), then rename it over `path` (which replaces a link itself, not its target)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # O_EXCL: fails on any existing name or link
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def make_grid(images, cols: int | None = None):
    """PIL images of one size -> one image, ``cols`` per row (default: a square)."""
    from PIL import Image

    n = len(images)
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "black")
    for i, img in enumerate(images):
        grid.paste(img, ((i % cols) * w, (i // cols) * h))
    return grid
