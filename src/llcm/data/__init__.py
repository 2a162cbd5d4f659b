"""The MedImgs-style dataset builder and the embedded offline dataset.

- `build_dataset(sources, out, **options) -> stats`: folders/archives of medical images ->
  `train/` and `test/` image folders with `metadata.jsonl`, `card.md` and `stats.json`.
- `build_mini(out, size=64, seed=0) -> Path`: the offline dataset generated from pixels shipped
  inside scikit-image, nilearn and pydicom plus procedural phantoms, run through `build_dataset`.
- `read_split(dir, split) -> rows`: metadata rows with absolute `path`s, for training code.
"""

from __future__ import annotations

from pathlib import Path

from llcm.data.build import BuildOptions, build_dataset, read_split

__all__ = ["BuildOptions", "build_dataset", "build_mini", "read_split"]


def build_mini(out, size: int = 64, seed: int = 0, **options) -> Path:
    """Build the embedded dataset into `out` (see `llcm.data.mini`)."""
    from llcm.data.mini import build_mini as _build_mini

    return _build_mini(out, size=size, seed=seed, **options)
