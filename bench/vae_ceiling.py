"""The ceiling a VAE puts on every generator built on it: its reconstructions of the test split, scored
by the same evaluation as generated images.

A latent diffusion model (teacher or consistency student) can only produce images its VAE decoder can
draw. If decode(encode(x)) of a real test image already loses a finding (a microaneurysm, a small
nodule), no sampler will put it back, and the evaluation's classifier accuracy on the reconstructions
bounds what the generated images can reach (the "rFID" of the LDM papers, here with the class check).

    python bench/vae_ceiling.py --data D --model RUN/vae/model --out /tmp/recon [--per-class 20]
    llcm evaluate --data D --out /tmp/recon-eval --model vae-recon=/tmp/recon:images@1 --per-class 20 --no-memorization

The first command writes OUT/1/<class>/<i>.png (the layout `llcm evaluate` reads for `:images`) from the
first --per-class test images of each class (sorted by file name) and prints the second command, whose
report gives FID, per-class FID and classifier accuracy of the reconstructions next to the real test
images' accuracy. Add the real generators as further --model entries to see them against the ceiling.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from llcm.errors import UserError
from llcm.evaluation.evaluate import class_of, class_table
from llcm.vae import load_pixels, load_vae, psnr, reconstruct, scan_split, vae_factor


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="dataset folder (what `llcm data build/mini` writes)")
    ap.add_argument("--model", required=True, help="a VAE folder, a model folder with vae/, or a `llcm train vae` run")
    ap.add_argument("--out", required=True, help="folder to write (must not exist, or be empty)")
    ap.add_argument("--split", default="test", help="split to reconstruct (default test)")
    ap.add_argument("--per-class", type=int, default=20, help="images per class (default 20, as the recipe's eval)")
    args = ap.parse_args(argv)

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"error: {out} exists and is not empty; pick a new --out (nothing was written)")
    try:
        vae = load_vae(args.model)
        split = scan_split(args.data, args.split, vae_factor(vae))  # readable, one size, a multiple of the factor
        classes, rows = class_table(args.data, args.split)  # class names exactly as `llcm evaluate` has them
    except UserError as exc:
        raise SystemExit(f"error: {exc}") from None
    index = {str(Path(f).resolve()): i for i, f in enumerate(split.files)}
    scores = {}
    for c in classes:
        paths = sorted(r["path"] for r in rows if class_of(r) == c.name)[:args.per_class]
        pixels = load_pixels(split, [index[str(Path(p).resolve())] for p in paths])
        with torch.no_grad():
            rec = reconstruct(vae, pixels)
        folder = out / "1" / c.name
        folder.mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(rec):
            Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(folder / f"{i}.png")
        scores[c.name] = round(float(psnr(rec, pixels.float() / 255).mean()), 2)
        print(f"{c.name:<32} {len(paths):>4} images  PSNR {scores[c.name]:6.2f} dB", flush=True)
    (out / "reconstructions.json").write_text(json.dumps(
        {"data": str(args.data), "split": args.split, "model": str(args.model), "per_class": args.per_class,
         "psnr_db_per_class": scores}, indent=2))
    cmd = ["llcm", "evaluate", "--data", str(args.data), "--out", str(out) + "-eval", "--model",
           f"vae-recon={out}:images@1", "--per-class", str(args.per_class), "--no-memorization"]
    print("score them with:\n  " + shlex.join(cmd))
    return 0


if __name__ == "__main__":
    sys.exit(main())
