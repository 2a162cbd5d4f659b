"""Cleaning: validation, content hash, the ternary perceptual hash and its multi-index search."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from llcm.data import cleaning
from llcm.data.cleaning import NearDuplicateIndex, check_frame, content_hash, hamming, perceptual_hash


def blobs(seed: int, size: int = 96) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = sum(rng.uniform(-1, 1) * np.exp(-((xx - rng.uniform()) ** 2 + (yy - rng.uniform()) ** 2)
                                         / (2 * rng.uniform(0.05, 0.25) ** 2)) for _ in range(6))
    img = img + rng.normal(0, 0.02, img.shape)
    return ((img - img.min()) / (img.max() - img.min()) * 255).astype(np.uint8)


def jpeg(arr: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(buf))


def test_check_frame_reasons():
    assert check_frame(blobs(0, 40), min_size=64) == cleaning.TOO_SMALL
    assert check_frame(np.full((96, 96), 7, np.uint8)) == cleaning.BLANK
    specks = np.zeros((96, 96), np.uint8)
    specks[10, 10] = 255  # one bright pixel is still blank at the thumbnail's scale
    assert check_frame(specks) == cleaning.BLANK
    assert check_frame(blobs(0)) is None


def test_content_hash_is_pixel_exact():
    a = blobs(1)
    assert content_hash(a) == content_hash(a.copy())
    b = a.copy()
    b[0, 0] ^= 1
    assert content_hash(a) != content_hash(b)
    assert content_hash(a) != content_hash(a.reshape(48, 192))


def test_perceptual_hash_separates_reencodings_from_distinct_images():
    """The numbers behind the default distance of 12 (of 512 bits)."""
    images = [blobs(i) for i in range(12)]
    same = []
    for a in images:
        same += [hamming(perceptual_hash(a), perceptual_hash(jpeg(a, 75))),
                 hamming(perceptual_hash(a), perceptual_hash(np.asarray(Image.fromarray(a).resize((160, 160))))),
                 hamming(perceptual_hash(a), perceptual_hash((a * 0.9).astype(np.uint8)))]
    hashes = [perceptual_hash(a) for a in images]
    different = [hamming(hashes[i], hashes[j]) for i in range(12) for j in range(i + 1, 12)]
    assert max(same) <= 8 < 12 < 30 <= min(different)


def test_multi_index_search_matches_brute_force():
    rng = np.random.default_rng(0)
    base = [int.from_bytes(rng.bytes(64), "big") for _ in range(200)]
    queries = []
    for i in range(300):  # near copies at distances 0..20 plus unrelated hashes
        b = base[i % 200]
        flips = rng.choice(512, size=int(rng.integers(0, 21)), replace=False)
        q = b
        for f in flips:
            q ^= 1 << int(f)
        queries.append(q if i < 250 else int.from_bytes(rng.bytes(64), "big"))
    index = NearDuplicateIndex(12)
    for i, h in enumerate(base):
        index.add(h, i)
    for q in queries:
        brute = [i for i, h in enumerate(base) if hamming(q, h) <= 12]
        assert index.find(q) == (brute[0] if brute else None)
    assert NearDuplicateIndex(-1).find(base[0]) is None
