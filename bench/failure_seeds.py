"""Failure seeds: which seeds give a colourful, shapeless image of a grayscale class, with the sampling
start used before and with the one used now (llcm.sampling.initial_latents).

    OMP_NUM_THREADS=1 python bench/failure_seeds.py [--model default] [--seeds 128] [--steps 1,2,4]
        [--classes all|grayscale|"prompt;prompt"] [--data DIR] [--json OUT]

Every class (a prompt of the model's config.classes) and step count is sampled for seeds 0..N-1 twice,
from the same draws, weights, w and re-noising draws; only the start differs:
  before: eps + sqrt(alpha_bar_T) mu                (the draw's own per-channel spatial mean kept)
  now:    eps - mean_hw(eps) + sqrt(alpha_bar_T) mu (what the pipeline draws now)
mu = latent_mean in llcm.json. "now" is LLCMPipeline.sample_latents itself; "before" passes its start
as latents=.

Chroma of an image (RGB in [0, 1], taken before a grayscale class's luminance, i.e. keep_colour): the
mean over pixels of max(R, G, B) - min(R, G, B). The real images of the grayscale classes have chroma 0.
A failure is chroma > 0.15 in a grayscale class (config.grayscale); colour classes (fundus,
histopathology: real chroma 0.14-0.34) are sampled and listed, but chroma says nothing about them.

Shape check (with --data, a dataset of the model's classes, e.g. `llcm data mini --out DIR`): Pearson
correlation of a sample's luminance with its class's mean train image; "shapeless" = below the 5th
percentile of the real test images' correlation with that mean, so about 5% of samples of a model that
draws like the test split (every class, colour ones included; the histopathology crops have no shape,
their mean image is flat and the check says nothing about them).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings

import numpy as np
import torch

from llcm.images import LUMA
from llcm.pipeline import MAX_BATCH, LLCMPipeline, decode_latents, load_pipeline
from llcm.models import encode_prompts
from llcm.sampling import consistency_timesteps, draw_noise, make_generators, sample_consistency

THRESHOLD = 0.15  # chroma above which a sample of a grayscale class is a failure
STARTS = ("before", "now")


def chroma(images: np.ndarray) -> np.ndarray:
    """[B, H, W, 3] RGB in [0, 1] -> [B]: mean over pixels of max - min over the channels."""
    return (images.max(-1) - images.min(-1)).mean((1, 2))


def luminance(images: np.ndarray) -> np.ndarray:
    return images.astype(np.float64) @ np.asarray(LUMA)


def correlation(lum: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Pearson correlation of each [H, W] image in `lum` with `ref`."""
    x = lum.reshape(len(lum), -1)
    x = x - x.mean(1, keepdims=True)
    r = ref.ravel() - ref.mean()
    return (x @ r) / (np.linalg.norm(x, axis=1) * np.linalg.norm(r)).clip(1e-12)


def images(pipe: LLCMPipeline, prompt: str, seeds: list[int], steps: int, w: float, start: str) -> np.ndarray:
    """RGB samples (no luminance) of one prompt, in batches of at most MAX_BATCH."""
    c, out = pipe.components, []
    ts = consistency_timesteps(steps, pipe.schedule.num_train_timesteps, pipe.config.k)
    size = pipe.default_size() // c.vae_scale_factor
    shape = (c.unet.config.in_channels, size, size)
    for i in range(0, len(seeds), MAX_BATCH):
        chunk = seeds[i:i + MAX_BATCH]
        with torch.no_grad():
            if start == "now" or pipe.config.latent_mean is None:
                _, z0 = pipe.sample_latents([prompt] * len(chunk), steps, chunk, w)
            else:  # the start before the fix: the draw's own channel means kept
                gens = make_generators(chunk)
                a, _ = pipe.schedule.alpha_sigma(torch.tensor(float(ts[0]), dtype=torch.float64))
                mu = torch.tensor(pipe.config.latent_mean, dtype=torch.float64).view(-1, 1, 1)
                z = draw_noise(gens, shape) + (a * mu).float()
                emb = encode_prompts(c, [prompt]).expand(len(chunk), -1, -1)
                z0 = sample_consistency(pipe.model, emb, w, gens, shape, ts, latents=z)
            out.append(decode_latents(c, z0))
    return np.concatenate(out)


def class_means(data: str, prompts: list[str]) -> tuple[dict, dict]:
    """Per prompt: the mean train image (luminance) and the 5th percentile of the test images' correlation."""
    from llcm.vae import load_pixels, scan_split

    means, p05 = {}, {}
    train, test = scan_split(data, "train"), scan_split(data, "test")
    for p in prompts:
        tr = [i for i, t in enumerate(train.texts) if t == p]
        te = [i for i, t in enumerate(test.texts) if t == p]
        if not tr or not te:
            continue
        lum_tr = luminance(load_pixels(train, tr).permute(0, 2, 3, 1).numpy() / 255.0)
        lum_te = luminance(load_pixels(test, te).permute(0, 2, 3, 1).numpy() / 255.0)
        means[p] = lum_tr.mean(0)
        p05[p] = float(np.quantile(correlation(lum_te, means[p]), 0.05))
    return means, p05


def measure(pipe: LLCMPipeline, prompts: list[str], seeds: list[int], steps: list[int], w: float,
            data: str | None) -> dict:
    means, p05 = class_means(data, prompts) if data else ({}, {})
    result = {}
    for p in prompts:
        gray = p in pipe.config.grayscale
        result[p] = {"grayscale": gray, "real_corr_p05": p05.get(p), "steps": {}}
        for n in steps:
            row = {}
            for start in STARTS:
                im = images(pipe, p, seeds, n, w, start)
                c = chroma(im)
                r = {"median_chroma": round(float(np.median(c)), 4)}
                if gray:
                    r["failing_seeds"] = [s for s, v in zip(seeds, c) if v > THRESHOLD]
                if p in means:
                    corr = correlation(luminance(im), means[p])
                    r["median_corr"] = round(float(np.median(corr)), 3)
                    r["shapeless_seeds"] = [s for s, v in zip(seeds, corr) if v < p05[p]]
                    if gray:
                        bad = c > THRESHOLD
                        r["median_corr_of_failures"] = round(float(np.median(corr[bad])), 3) if bad.any() else None
                row[start] = r
            result[p]["steps"][str(n)] = row
        print(f"  {p}: done", file=sys.stderr, flush=True)
    return result


def markdown(result: dict, steps: list[int], n_seeds: int) -> str:
    cols = " | ".join(f"{n} step{'s' if n > 1 else ''}" for n in steps)
    lines = [f"Failures (chroma > {THRESHOLD}) of {n_seeds} seeds, before → now:", "",
             f"| class | {cols} |", "|---|" + "---:|" * len(steps)]
    for p, r in result.items():
        cells = []
        for n in steps:
            b, a = r["steps"][str(n)]["before"], r["steps"][str(n)]["now"]
            cells.append(f"{len(b['failing_seeds'])} → {len(a['failing_seeds'])}" if r["grayscale"] else
                         f"colour (median chroma {b['median_chroma']:.2f} → {a['median_chroma']:.2f})")
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    lines += ["", "Failing seeds, before / now:", ""]
    for p, r in result.items():
        if r["grayscale"]:
            for n in steps:
                b, a = r["steps"][str(n)]["before"], r["steps"][str(n)]["now"]
                lines.append(f"- {p}, {n} step(s): {b['failing_seeds']} / {a['failing_seeds']}")
    if any(r["real_corr_p05"] is not None for r in result.values()):
        lines += ["", f"Shapeless (correlation with the class's mean train image below the real test images' "
                      f"5th percentile; ~{round(0.05 * n_seeds)} of {n_seeds} expected), before → now; "
                      "median correlation of the chroma failures in brackets:", "",
                  f"| class | real p5 | {cols} |", "|---|---:|" + "---:|" * len(steps)]
        for p, r in result.items():
            if r["real_corr_p05"] is None:
                continue
            cells = []
            for n in steps:
                b, a = r["steps"][str(n)]["before"], r["steps"][str(n)]["now"]
                fc = b.get("median_corr_of_failures")
                cells.append(f"{len(b['shapeless_seeds'])} → {len(a['shapeless_seeds'])}"
                             + (f" ({fc:.2f})" if fc is not None else ""))
            lines.append(f"| {p} | {r['real_corr_p05']:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default", help="model folder or 'default' (the model shipped with llcm)")
    ap.add_argument("--seeds", type=int, default=128, help="seeds 0..N-1 (default 128)")
    ap.add_argument("--steps", default="1,2,4", help="step counts (default 1,2,4)")
    ap.add_argument("--classes", default="all",
                    help="all (config.classes), grayscale (config.grayscale) or prompts separated by ';'")
    ap.add_argument("--w", type=float, default=None, help="guidance w (default: the model's w_default)")
    ap.add_argument("--data", default=None, help="dataset of the model's classes, for the shape check")
    ap.add_argument("--json", default=None, help="also write the numbers (and every failing seed) here")
    args = ap.parse_args(argv)

    pipe = load_pipeline(args.model)
    prompts = {"all": pipe.config.classes, "grayscale": pipe.config.grayscale}.get(
        args.classes, [p.strip() for p in args.classes.split(";") if p.strip()])
    steps = [int(s) for s in args.steps.split(",")]
    seeds = list(range(args.seeds))
    w = pipe.config.w_default if args.w is None else args.w
    if pipe.config.latent_mean is None:
        print("this model records no latent_mean: both starts are plain N(0, I) noise", file=sys.stderr)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = measure(pipe, prompts, seeds, steps, w, args.data)
    print(f"model {args.model} (hash {pipe.model_hash}), w = {w}, seeds 0..{args.seeds - 1}, "
          f"{time.perf_counter() - t0:.0f} s, torch threads {torch.get_num_threads()}\n")
    print(markdown(result, steps, args.seeds))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "model_hash": pipe.model_hash, "w": w, "seeds": args.seeds,
                       "steps": steps, "chroma_threshold": THRESHOLD, "classes": result}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
