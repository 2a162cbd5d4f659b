"""Does a VAE reconstruct medical images of kinds it never saw? PSNR and SSIM per modality.

Scores each VAE on the test crops of every modality of `llcm data openworld` (pixels no train crop
uses) and, with --data, on the test split of a dataset (e.g. `llcm data mini`). Modalities named by
--held-out are marked as left out of the VAE's training (the default VAE never saw ultrasound,
microscopy or nuclear medicine).

--leave-one-out M1,M2 trains, for each listed modality M, a VAE from --init on the open-world corpus
without M (plus --anchor data with its latents held, as the default VAE was trained) for --steps
steps and scores it on M: a true leave-one-modality-out measurement of a modality the shipped VAE
did train on.

    python bench/vae_open_world.py --model shipped=default --model old=path/to/old/vae --data data/mini
    python bench/vae_open_world.py --leave-one-out ct,fundus --init default --anchor data/mini --steps 600
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from llcm.data.openworld import HELD_OUT, MODALITIES, corpus
from llcm.evaluation.memorization import ssim
from llcm.vae import load_pixels, load_vae, psnr, reconstruct, scan_split


def _vae(spec: str):
    if spec == "default":
        from llcm.pipeline import default_model_path

        spec = str(default_model_path())
    return load_vae(spec)


def score(vae, pixels: torch.Tensor) -> dict:
    """Mean PSNR (dB) and SSIM (per RGB channel, averaged) of reconstructions of uint8 [N, 3, H, W]."""
    rec = reconstruct(vae, pixels)
    ref = pixels.float() / 255
    s = ssim(rec.numpy(), ref.numpy())  # [N, 3]
    return {"psnr_db": round(float(psnr(rec, ref).mean()), 2), "ssim": round(float(s.mean()), 4), "images": len(pixels)}


def test_sets(per_modality: int, data: str | None, seed: int) -> dict[str, torch.Tensor]:
    sets = {}
    for name in MODALITIES:
        imgs, _ = corpus([name], per_modality, 64, seed, "test")
        sets[name] = torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous()
    if data:
        split = scan_split(data, "test", 4)
        sets[f"data:{Path(data).name}"] = load_pixels(split)
    return sets


def leave_one_out(names: list[str], args) -> dict[str, dict]:
    """Train one VAE per left-out modality (same budget, anchor and seed as given) and score it on that modality."""
    from llcm.training import TrainConfig, train
    from llcm.vae import VAETask

    anchor = load_pixels(scan_split(args.anchor, "train", 4)) if args.anchor else None
    out = {}
    for name in names:
        rest = [m for m in MODALITIES if m not in HELD_OUT and m != name]
        imgs, _ = corpus(rest, args.train_per_modality, 64, args.seed, "train", colour_jitter=args.colour_jitter)
        px = torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous()
        vae = _vae(args.init)
        task = VAETask(vae, px, anchor_pixels=anchor, anchor_weight=args.anchor_weight)
        t0 = time.perf_counter()
        cfg = TrainConfig(out=str(Path(args.work) / f"loo-{name}"), max_steps=args.steps, batch_size=args.batch,
                          lr=args.lr, checkpoint_every=10**9, progress=False)
        train(task, cfg)
        trained = load_vae(Path(args.work) / f"loo-{name}" / "model")
        test, _ = corpus([name], args.per_modality, 64, args.seed, "test")
        out[name] = {**score(trained, torch.from_numpy(test).permute(0, 3, 1, 2).contiguous()),
                     "trained_on": rest, "steps": args.steps, "train_s": round(time.perf_counter() - t0, 1)}
        print(name, out[name], flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", metavar="NAME=PATH",
                    help="a VAE to score (a model folder, a VAE folder, or 'default'); repeatable")
    ap.add_argument("--data", help="also score the test split of this imagefolder dataset")
    ap.add_argument("--held-out", default=",".join(HELD_OUT), help="modalities left out of the VAEs' training")
    ap.add_argument("--per-modality", type=int, default=100, help="test crops per modality (default 100)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--leave-one-out", default="", help="comma-separated modalities: train a VAE without each")
    ap.add_argument("--init", default="default", help="VAE to start leave-one-out training from")
    ap.add_argument("--anchor", help="dataset whose latents leave-one-out training holds (as the default VAE's)")
    ap.add_argument("--anchor-weight", type=float, default=10.0)
    ap.add_argument("--train-per-modality", type=int, default=1500)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--colour-jitter", action="store_true",
                    help="random hue rotations and saturation in the leave-one-out training crops")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--work", default="/tmp/vae-loo", help="folder for the leave-one-out runs")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    torch.manual_seed(0)
    held = [m for m in args.held_out.split(",") if m]
    results: dict = {"held_out": held}
    if args.model or not args.leave_one_out:
        sets = test_sets(args.per_modality, args.data, args.seed)
        models = dict(m.split("=", 1) for m in (args.model or ["default=default"]))
        table = {name: {k: score(_vae(path), px) for k, px in sets.items()} for name, path in models.items()}
        results["models"] = table
        print("| modality | " + " | ".join(f"{n} PSNR dB / SSIM" for n in table) + " |")
        print("|---|" + "---:|" * len(table))
        for k in sets:
            mark = " (left out)" if k in held else ""
            print(f"| {k}{mark} | " + " | ".join(f"{t[k]['psnr_db']:.2f} / {t[k]['ssim']:.3f}" for t in table.values())
                  + " |")
    if args.leave_one_out:
        results["leave_one_out"] = leave_one_out([m for m in args.leave_one_out.split(",") if m], args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
