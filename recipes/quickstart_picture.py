"""The README's first picture: exactly what its first command draws (the default model, 4 steps, seeds
0-3), each image enlarged 2x with its seed under it.

    python recipes/quickstart_picture.py [--prompt "axial brain MRI, T1-weighted"] [--out docs/img/quickstart.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from llcm.pipeline import load_pipeline


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", default="axial brain MRI, T1-weighted")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", type=Path, default=Path("docs/img/quickstart.png"))
    args = ap.parse_args()
    out = load_pipeline("default")([args.prompt] * 4, args.steps, [0, 1, 2, 3])
    tiles = []
    for seed, img in enumerate(out.images):
        im = Image.fromarray((np.clip(img, 0, 1) * 255).round().astype(np.uint8))
        im = im.resize((im.width * 2, im.height * 2), Image.Resampling.NEAREST)
        tile = Image.new("RGB", (im.width, im.height + 16), "white")
        tile.paste(im, (0, 0))
        ImageDraw.Draw(tile).text((4, im.height + 2), f"seed {seed}", fill="black")
        tiles.append(np.asarray(tile))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(tiles, axis=1)).save(args.out)
    print(f"{args.out}: {args.prompt!r}, {args.steps} steps, seeds 0-3")


if __name__ == "__main__":
    main()
