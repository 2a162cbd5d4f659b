"""Image helpers shared by generation, evaluation and the benches: colour mode of a class, luminance.

Most medical modalities are grayscale, while the VAE (like Stable Diffusion's) is RGB: a sample that lies
slightly off the latents of real images decodes with a colour cast that no grayscale image has. A class
whose training images are grayscale is therefore recorded as such (llcm.json "grayscale"), and its
samples are returned as their luminance, repeated on the three channels.
"""

from __future__ import annotations

import numpy as np

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
