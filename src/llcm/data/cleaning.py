"""Validation and de-duplication: pure functions on decoded 8-bit frames.

- `check_frame`: below the minimum size, or constant/blank (standard deviation of the 64x64
  luminance thumbnail under a threshold, in 0-255 units).
- `content_hash`: SHA-256 of the decoded pixels (shape + bytes, grayscale-equal RGB collapsed
  to gray), so the same picture stored as PNG and as BMP is one exact duplicate.
- `perceptual_hash`: a 512-bit ternary DCT hash (pHash on a 64x64 luminance thumbnail: the 16x16
  lowest frequencies, each marked above or below their median by a margin). Re-encoding, resizing
  and mild intensity changes move it by under 10 bits; distinct images, even phantoms of one
  anatomy, differ by 30 or more (measured in tests/test_data_cleaning.py).
- `NearDuplicateIndex`: finds a stored hash within Hamming distance `d` without comparing against
  everything: the 512 bits are split into d + 1 bands, and by the pigeonhole principle two hashes
  within distance d agree exactly on at least one band (multi-index hashing).
"""

from __future__ import annotations

import hashlib

import numpy as np

TOO_SMALL = "too_small"
BLANK = "blank"
EXACT_DUPLICATE = "exact_duplicate"
NEAR_DUPLICATE = "near_duplicate"

HASH_BITS = 512


def thumbnail(pixels: np.ndarray) -> np.ndarray:
    """64x64 luminance (box filter) as float64: what the blank check and the pHash look at."""
    from PIL import Image

    img = Image.fromarray(pixels)
    if img.mode != "L":
        img = img.convert("L")
    return np.asarray(img.resize((64, 64), Image.Resampling.BOX), dtype=np.float64)


def check_frame(pixels: np.ndarray, *, min_size: int = 64, blank_std: float = 2.0,
                thumb: np.ndarray | None = None) -> str | None:
    """The rejection reason for a decoded frame, or None if it may enter the dataset.

    Blank: the standard deviation of the 64x64 luminance thumbnail is below `blank_std` (0-255
    units): constant images, and images with nothing but pixel noise or a few specks."""
    h, w = pixels.shape[:2]
    if min(h, w) < min_size:
        return TOO_SMALL
    if thumb is None:
        thumb = thumbnail(pixels)
    if float(thumb.std()) < blank_std:
        return BLANK
    return None


def content_hash(pixels: np.ndarray) -> str:
    """SHA-256 hex digest of the decoded pixels (shape included)."""
    h = hashlib.sha256()
    h.update(("x".join(str(s) for s in pixels.shape) + ":").encode())
    h.update(np.ascontiguousarray(pixels, dtype=np.uint8).tobytes())
    return h.hexdigest()


_DCT = None


def _dct_basis() -> np.ndarray:
    """The 16 lowest rows of the orthonormal DCT-II matrix of size 64 (16 x 64)."""
    global _DCT
    if _DCT is None:
        n = np.arange(64)
        k = np.arange(16)[:, None]
        basis = np.cos(np.pi * (2 * n + 1) * k / 128) * np.sqrt(2 / 64)
        basis[0] /= np.sqrt(2)
        _DCT = basis
    return _DCT


def perceptual_hash(pixels: np.ndarray, thumb: np.ndarray | None = None) -> int:
    """512-bit ternary DCT perceptual hash of a uint8 gray or RGB frame, as a Python int.

    The 16x16 lowest DCT-II frequencies of the 64x64 luminance thumbnail (computed as C X C^T)
    are compared with their median m: bit i of the first half is set when c_i > m + tau, bit i
    of the second half when c_i < m - tau, with tau = 0.1 * std of the 255 AC coefficients.
    Coefficients within tau of the median (noise in smooth images) set neither bit, so
    re-encoding cannot flip them; a plain median-threshold pHash flips dozens of them."""
    small = thumbnail(pixels) if thumb is None else thumb
    c = _dct_basis()
    coeffs = (c @ small @ c.T).ravel()
    ac = coeffs[1:]
    med = np.median(ac)
    tau = 0.1 * float(ac.std())
    bits = np.concatenate([coeffs > med + tau, coeffs < med - tau])
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


class NearDuplicateIndex:
    """Perceptual hashes seen so far; `find` returns the first stored item within `max_distance`."""

    def __init__(self, max_distance: int) -> None:
        self.max_distance = int(max_distance)
        n_bands = max(1, min(self.max_distance + 1, HASH_BITS))
        edges = np.linspace(0, HASH_BITS, n_bands + 1).round().astype(int)
        self._bands = [(int(lo), (1 << int(hi - lo)) - 1) for lo, hi in zip(edges[:-1], edges[1:])]
        self._tables: list[dict[int, list[int]]] = [{} for _ in self._bands]
        self._hashes: list[int] = []
        self._ids: list = []

    def __len__(self) -> int:
        return len(self._hashes)

    def find(self, value: int):
        """The id of the earliest stored hash within the distance (ties: lowest insertion order)."""
        if self.max_distance < 0:
            return None
        best = None
        for (shift, mask), table in zip(self._bands, self._tables):
            for pos in table.get((value >> shift) & mask, ()):
                if (best is None or pos < best) and hamming(value, self._hashes[pos]) <= self.max_distance:
                    best = pos
        return None if best is None else self._ids[best]

    def add(self, value: int, item_id) -> None:
        pos = len(self._hashes)
        self._hashes.append(value)
        self._ids.append(item_id)
        for (shift, mask), table in zip(self._bands, self._tables):
            table.setdefault((value >> shift) & mask, []).append(pos)
