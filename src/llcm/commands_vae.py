"""`llcm train vae` (a small AutoencoderKL on a dataset's images) and `llcm encode` (images -> cached latents)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from llcm.errors import UserError

TRAIN_VAE_HELP = """\
Train a small diffusers AutoencoderKL on the train split of an imagefolder dataset (what
`llcm data build` / `llcm data mini` write: DATA/train/metadata.jsonl + images, all one size).
The config comes from the preset's "vae" entry (or --init starts from an existing VAE folder, e.g.
Stable Diffusion's vae/). Loss per image: L1 + L2 reconstruction + kl_weight * KL (LDM weighting,
default 1e-6); there is no perceptual/adversarial term (that needs a pretrained feature network,
which llcm never downloads). Images are held in memory as uint8: meant for small datasets.

At the end OUT/model is a diffusers AutoencoderKL folder whose config carries the latent scaling
factor measured on the data (1 / std of the train posterior means), with vae_report.json:
reconstruction PSNR on the test split next to the PSNR of predicting the mean image.

examples:
  llcm train vae --data data/mini --out runs/vae                    tiny-cpu VAE, 2000 steps
  llcm train vae --data data/mini --out runs/vae --steps 50 --dry-run
  llcm train vae --data data/mini --out runs/vae --resume            continue after an interruption
"""

ENCODE_HELP = """\
Encode a split of an imagefolder dataset into VAE latents once, cached in OUT as a LatentSet
(latents.safetensors + latents.json) that training reads instead of images. The latents are the
VAE posterior means (deterministic) times the VAE's scaling factor.

Running it again with the same VAE and data does nothing; a cache made by a different VAE, other
data, another split or --flip setting is refused unless --overwrite.

examples:
  llcm encode --data data/mini --model runs/vae/model --out data/mini-latents
  llcm encode --data data/mini --model path/to/stable-diffusion-v1-5 --out latents-sd15 --split test
"""


def register(sub) -> None:
    from llcm.commands_train import train_subparsers

    p = train_subparsers(sub).add_parser("vae", help="train a small AutoencoderKL on a dataset's images",
                                         description=TRAIN_VAE_HELP,
                                         formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="dataset folder with train/ (and test/) imagefolder splits")
    p.add_argument("--out", required=True, help="run folder: checkpoints/, metrics.jsonl, model/")
    p.add_argument("--preset", default="tiny-cpu", help="preset (name or .json) whose 'vae' config is built "
                   "(default tiny-cpu)")
    p.add_argument("--init", default=None, metavar="VAE_FOLDER",
                   help="start from this local AutoencoderKL (a model folder with vae/, or a VAE folder)")
    p.add_argument("--steps", type=int, default=2000, help="optimiser steps (default 2000)")
    p.add_argument("--batch", type=int, default=16, help="global batch size (default 16)")
    p.add_argument("--lr", type=float, default=5e-4, help="AdamW learning rate (default 5e-4)")
    p.add_argument("--warmup", type=int, default=0, help="linear learning-rate warm-up steps (default 0)")
    p.add_argument("--kl-weight", type=float, default=None, help="KL weight, LDM normalisation (default 1e-6)")
    p.add_argument("--hard-pixel-weight", type=float, default=0.0,
                   help="weight of the squared error of each image's worst 2%% of pixels (default 0). Small "
                        "findings (microaneurysms, exudates, nodules: 1-3 px) barely move the mean losses, so a "
                        "small VAE drops them; 5 brought them back for the default model (README)")
    p.add_argument("--anchor", default=None, metavar="DATA",
                   help="a dataset (e.g. the one a teacher was trained on) whose train images are trained on too, "
                        "with their latents held to what the --init VAE gives them (see --anchor-weight); the saved "
                        "VAE keeps the --init scaling factor. So a VAE can learn new kinds of images while the "
                        "teacher and students built on the old latents stay valid. Needs --init")
    p.add_argument("--anchor-model", default=None, metavar="LLCM",
                   help="with --anchor: a model (e.g. 'default') whose own samples the decoder must also decode "
                        "as the --init VAE does: a student's latents lie near, not on, those of real images, and a "
                        "decoder held only on real latents drew the default model's samples with colour casts")
    p.add_argument("--anchor-samples", type=int, default=100, metavar="N",
                   help="latents sampled per class of --anchor-model (4 steps, seeded; default 100)")
    p.add_argument("--anchor-weight", type=float, default=1.0,
                   help="weight of the anchor term, mean squared latent drift in the model's units (default 1)")
    p.add_argument("--standardize-latents", action="store_true",
                   help="fold each latent channel's train mean/std into the saved VAE so that its latents have "
                        "mean 0, std 1 per channel (diffusion samples start from N(0, I); see llcm.vae)")
    p.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation micro-batches (default 1)")
    p.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial weights, batches and noise")
    p.add_argument("--eval-split", default="test", help="split for the PSNR report (default test; train if absent)")
    p.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints (default 500)")
    p.add_argument("--log-every", type=int, default=10, help="steps between metrics.jsonl rows (default 10)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in OUT")
    p.add_argument("--time-limit", type=float, default=0.0, metavar="MINUTES",
                   help="stop after this much training time and save the model as if finished (default: none)")
    p.add_argument("--dry-run", action="store_true", help="check the data, print the config, train nothing")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_train_vae)

    e = sub.add_parser("encode", help="images -> cached VAE latents (computed once)", description=ENCODE_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("--data", required=True, help="dataset folder with imagefolder splits (SPLIT/metadata.jsonl)")
    e.add_argument("--model", required=True,
                   help="local model folder with vae/, 'default' (the model shipped with llcm), an adapter folder "
                        "(its base's VAE), a `llcm train vae` run (or its model/), or a VAE folder")
    e.add_argument("--out", required=True, help="latent cache folder to write")
    e.add_argument("--split", default="train", help="split to encode (default train)")
    e.add_argument("--flip", action="store_true",
                   help="also add horizontally flipped copies. Off by default: in medical images left/right is "
                        "anatomy (laterality, situs), so a flipped image shows a different, often impossible, body")
    e.add_argument("--overwrite", action="store_true", help="replace a cache made by another VAE, data or setting")
    e.add_argument("--batch", type=int, default=16, help="images per encoder batch (default 16)")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=run_encode)


class _DryRun:
    name = "vae"


def run_train_vae(args: argparse.Namespace) -> int:
    from llcm.models import load_preset
    from llcm.training import TrainConfig, train, writable_folder
    from llcm.vae import DEFAULT_KL_WEIGHT, VAETask, build_vae, load_pixels, load_vae, scan_split, vae_factor

    kl_weight = DEFAULT_KL_WEIGHT if args.kl_weight is None else args.kl_weight
    if kl_weight < 0:
        raise UserError(f"--kl-weight must be >= 0, got {kl_weight}")
    if args.hard_pixel_weight < 0:
        raise UserError(f"--hard-pixel-weight must be >= 0, got {args.hard_pixel_weight}")
    if args.anchor and not args.init:
        raise UserError("--anchor keeps the latents of an existing VAE: give that VAE with --init")
    if args.anchor_model and not args.anchor:
        raise UserError("--anchor-model needs --anchor (the images whose latents are held)")
    if args.anchor_weight < 0:
        raise UserError(f"--anchor-weight must be >= 0, got {args.anchor_weight}")
    if args.init:
        vae = load_vae(args.init)
        source = {"init": str(args.init)}
    else:
        preset = load_preset(args.preset)
        if not preset.get("vae"):
            raise UserError(f"preset {args.preset!r} has no 'vae' config to build; use --preset tiny-cpu "
                            "or start from a VAE folder with --init")
        vae = build_vae(preset["vae"], seed=args.seed)
        source = {"preset": args.preset}
    f = vae_factor(vae)
    train_split = scan_split(args.data, "train", f)
    eval_split = None
    meta = train_split.root / args.eval_split / "metadata.jsonl"
    if meta.is_file() and meta.read_text().strip() and args.eval_split != "train":  # an empty split: train only
        eval_split = scan_split(args.data, args.eval_split, f)
        if (eval_split.height, eval_split.width) != (train_split.height, train_split.width):
            raise UserError(f"the {args.eval_split} images are {eval_split.width}x{eval_split.height} but the train "
                            f"images are {train_split.width}x{train_split.height}")
    cfg = TrainConfig(out=args.out, max_steps=args.steps, batch_size=args.batch, grad_accum=args.grad_accum,
                      lr=args.lr, warmup_steps=args.warmup, mixed_precision=args.mixed_precision, seed=args.seed,
                      checkpoint_every=args.checkpoint_every, log_every=args.log_every, progress=not args.quiet,
                      time_limit_minutes=args.time_limit)
    cfg.validate()
    extra = {"data": str(train_split.root), "data_hash": train_split.data_hash, "train_images": len(train_split),
             "eval_split": eval_split.split if eval_split else "train (no test split)",
             "image_size": [train_split.height, train_split.width], "kl_weight": kl_weight,
             "hard_pixel_weight": args.hard_pixel_weight, "anchor": args.anchor, "anchor_weight": args.anchor_weight,
             "standardize_latents": args.standardize_latents, **source,
             "vae": {k: v for k, v in vae.config.items() if not k.startswith("_")}}
    if args.dry_run:
        train(_DryRun(), cfg, dry_run=True, extra_config=extra)
        return 0
    writable_folder(args.out)
    if eval_split is None and args.eval_split != "train":
        print(f"note: {args.data} has no {args.eval_split!r} split; PSNR is measured on the train images")
    n_eval = len(eval_split) if eval_split else 0
    mib = (len(train_split) + n_eval) * 3 * train_split.height * train_split.width / 2**20
    print(f"loading {len(train_split)} train + {n_eval} {args.eval_split} images into memory ({mib:.0f} MiB, uint8)")
    train_px = load_pixels(train_split)
    eval_px = load_pixels(eval_split) if eval_split else None
    anchor_px = None
    if args.anchor:
        anchor_split = scan_split(args.anchor, "train", f)
        if (anchor_split.height, anchor_split.width) != (train_split.height, train_split.width):
            raise UserError(f"the --anchor images are {anchor_split.width}x{anchor_split.height} but the train "
                            f"images are {train_split.width}x{train_split.height}")
        print(f"anchoring the latents of {len(anchor_split)} images of {anchor_split.root}")
        anchor_px = load_pixels(anchor_split)
        source = {**source, "anchor": str(anchor_split.root), "anchor_data_hash": anchor_split.data_hash}
    anchor_z = None
    if args.anchor_model:
        anchor_z = model_samples(args.anchor_model, vae, args.anchor_samples, args.seed,
                                 (train_split.height, train_split.width))
        source = {**source, "anchor_model": args.anchor_model, "anchor_samples_per_class": args.anchor_samples}
    task = VAETask(vae, train_px, eval_px, eval_split.split if eval_split else "train", kl_weight=kl_weight,
                   steps=args.steps, standardize_latents=args.standardize_latents,
                   hard_pixel_weight=args.hard_pixel_weight, anchor_pixels=anchor_px, anchor_weight=args.anchor_weight,
                   anchor_latents=anchor_z,
                   source={"data": str(train_split.root), "data_hash": train_split.data_hash, **source})
    try:
        summary = train(task, cfg, resume=args.resume, extra_config=extra)
    except FloatingPointError as exc:
        raise UserError(str(exc)) from None
    if summary["status"] != "finished":
        return 130 if summary["status"] == "interrupted" else 1
    r = task.report
    print(f"reconstruction PSNR on {r['psnr_split']} ({r['psnr_images']} images): {r['psnr_db']:.2f} dB "
          f"(predicting the mean image: {r['baseline_mean_image_psnr_db']:.2f} dB); "
          f"latent scaling factor {r['scaling_factor']:.5g}")
    print(f"VAE saved to {summary['model']} (report: {Path(summary['model']) / 'vae_report.json'})")
    print(json.dumps(r))
    return 0


def model_samples(spec: str, vae, per_class: int, seed: int, size: tuple[int, int]):
    """Unscaled latents a model samples for each of its classes (4 steps), for the VAE's decoder anchor."""
    import json

    from llcm.models import load_components
    from llcm.pipeline import resolve_model
    from llcm.replay import sample_replay

    folder = resolve_model(spec)
    comps = load_components(folder)
    sf = float(vae.config.scaling_factor)
    if abs(comps.scaling_factor - sf) > 1e-6 * sf:
        raise UserError(f"--anchor-model {spec} scales its latents by {comps.scaling_factor}, the --init VAE by {sf}: "
                        "give the model trained on this VAE's latents")
    cfg = json.loads((folder / "llcm.json").read_text()) if (folder / "llcm.json").is_file() else {}
    f = comps.vae_scale_factor
    shape = (comps.latent_channels, size[0] // f, size[1] // f)
    print(f"sampling {per_class} latents per class of {spec} for the decoder anchor")
    return sample_replay(comps, cfg, shape, per_class, seed).latents / sf


def run_encode(args: argparse.Namespace) -> int:
    from llcm.adapter import full_model_folder
    from llcm.encode import encode_split
    from llcm.pipeline import resolve_model

    model = full_model_folder(resolve_model(args.model))  # an adapter has no VAE of its own: its base's
    latents, info = encode_split(args.data, model, args.out, split=args.split, flip=args.flip,
                                 overwrite=args.overwrite, batch_size=args.batch, progress=not args.quiet)
    if info["skipped"]:
        print(f"{args.out} is up to date (VAE {info['vae_hash']}, data {info['data_hash']}, split {args.split}, "
              f"flip {args.flip}): nothing to do")
        return 0
    shape = "x".join(str(s) for s in latents.latents.shape[1:])
    print(f"encoded {len(latents)} latents ({shape}{', with flips' if args.flip else ''}) of split {args.split} "
          f"in {info['seconds']:.1f} s -> {args.out}: std {info['std']:.3f}, mean {info['mean']:.3f} after "
          f"scaling by {info['scaling_factor']:.5g}; {len(latents.prompts)} prompts; VAE {info['vae_hash']}")
    return 0
