"""The README's before/after picture of recipes/adapt.sh: per modality, a row of real test crops, the
zero-shot model's 4-step images and the adapted model's (same seeds), read from the evaluation folders,
or with --sweep from `bench/lcf_sweep.py run` outputs (SWEEP/NAME.npz, key s4).

    python recipes/adapt_picture.py runs/adapt --run lcf-600 --out docs/img/adapt.png
    python recipes/adapt_picture.py runs/adapt --run defaults --sweep ultrasound=runs/sw-us,nuclear-medicine=runs/sw-nm
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def row(files: list[Path], n: int) -> np.ndarray:
    return np.concatenate([np.asarray(Image.open(f).convert("RGB")) for f in files[:n]], axis=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--run", default="lcf-600", help="the adapted model's name in the evaluation")
    ap.add_argument("--modalities", default="ultrasound,nuclear-medicine")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--out", type=Path, default=Path("docs/img/adapt.png"))
    ap.add_argument("--sweep", default="", help="MODALITY=DIR,...: read the 4-step images from DIR/NAME.npz")
    args = ap.parse_args()
    rows, labels = [], []
    for m in args.modalities.split(","):
        d = args.run_dir / m
        test = sorted((d / "data" / "test" / m).glob("*.png"))
        rows.append(row(test, args.n))
        labels.append(f"{m}: real test crops")
        sweep = dict(kv.split("=", 1) for kv in args.sweep.split(",") if kv)
        for name in ("zero-shot", args.run):
            if m in sweep:
                imgs = np.load(Path(sweep[m]) / f"{name}.npz")["s4"][:args.n]
                rows.append(np.concatenate([np.asarray(Image.fromarray(i).convert("RGB")) for i in imgs], axis=1))
            else:
                imgs = sorted((d / "eval" / "images" / name / "consistency-4").glob("*/*.png"))
                rows.append(row(imgs, args.n))
            labels.append(f"{m}: {name}, 4 steps")
    pad = 170
    grid = np.concatenate(rows, axis=0)
    canvas = Image.new("RGB", (grid.shape[1] + pad, grid.shape[0]), "white")
    canvas.paste(Image.fromarray(grid), (pad, 0))
    draw = ImageDraw.Draw(canvas)
    h = grid.shape[0] // len(rows)
    for i, text in enumerate(labels):
        draw.text((4, i * h + h // 2 - 6), text, fill="black")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(args.out)
    print(json.dumps({"out": str(args.out), "rows": labels}))


if __name__ == "__main__":
    main()
