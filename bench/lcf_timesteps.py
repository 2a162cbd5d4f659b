"""Sample a model's new prompt on other timestep lists than the k-grid's default (80 seeds each), one
OUT/NAME.npz per list, for `python bench/lcf_sweep.py score --data DATA --out OUT` to score; --plain starts
from plain N(0, I) noise instead of the centred start (llcm.sampling.initial_latents).

    python bench/lcf_timesteps.py MODEL LATENTS OUT 999-799-599-399 799-599-399-199 [--plain] [--w W]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from llcm.latents import LatentSet
from llcm.pipeline import LLCMPipeline


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("latents")
    ap.add_argument("out")
    ap.add_argument("lists", nargs="+", help="timesteps, high to low, joined by '-'")
    ap.add_argument("--plain", action="store_true", help="start from plain N(0, I) noise")
    ap.add_argument("--per-class", type=int, default=80)
    ap.add_argument("--w", type=float, default=None, help="guidance scale (default: the model's)")
    args = ap.parse_args()
    pipe = LLCMPipeline.from_pretrained(args.model)
    if args.plain:
        pipe.config.latent_mean = None
    prompt = list(dict.fromkeys(LatentSet.load(args.latents).prompts))[0]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    for text in args.lists:
        ts = [int(t) for t in text.split("-")]
        seeds = list(range(args.per_class))
        images = np.concatenate([pipe([prompt] * len(seeds[i:i + 40]), len(ts), seeds[i:i + 40], w=args.w,
                                             timesteps=ts).images
                                 for i in range(0, len(seeds), 40)])
        name = ("plain-" if args.plain else "") + text + ("" if args.w is None else f"-w{args.w:g}")
        info = {"name": name, "options": f"timesteps {ts}" + (", plain start" if args.plain else "")
                + ("" if args.w is None else f", w {args.w:g}"), "train_s": 0}
        np.savez_compressed(Path(args.out) / f"{name}.npz", info=json.dumps(info),
                            **{f"s{len(ts)}": (np.clip(images, 0, 1) * 255).round().astype(np.uint8)})


if __name__ == "__main__":
    main()
