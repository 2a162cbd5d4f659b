"""`llcm train vae | teacher | dreambooth`: the models trained from images or latents before distillation."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from llcm.cli.options import (LOOP_HELP, add_loop_options, add_run_options, check_out, input_folders, load_latents,
                              loop_config, outcome, prepare_run, recorded_args, require_folder, run_training,
                              train_subparsers)
from llcm.errors import UserError
from llcm.fileio import record_name
from llcm.presets import training_defaults

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


def register_vae(train_sub) -> None:
    p = train_sub.add_parser("vae", help="train a small AutoencoderKL on a dataset's images",
                                         description=TRAIN_VAE_HELP,
                                         formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="dataset folder with train/ (and test/) imagefolder splits")
    p.add_argument("--out", required=True, help="run folder: checkpoints/, metrics.jsonl, model/")
    p.add_argument("--preset", default="tiny-cpu", help="preset (name or .json) whose 'vae' config is built "
                   "(default tiny-cpu)")
    p.add_argument("--init", default=None, metavar="VAE_FOLDER",
                   help="start from this AutoencoderKL (a model folder with vae/, or a VAE folder; or a Hugging "
                        "Face id org/name[@revision] already in the local HF cache)")
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
    p.add_argument("--eval-split", default="test", help="split for the PSNR report (default test; train if absent)")
    p.add_argument("--log-every", type=int, default=10, help="steps between metrics.jsonl rows (default 10)")
    add_run_options(p)
    p.set_defaults(func=run_train_vae)


class _DryRun:
    name = "vae"


def run_train_vae(args: argparse.Namespace) -> int:
    from llcm.pipeline import model_record
    from llcm.presets import load_preset
    from llcm.replay import anchor_samples
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
    cfg = TrainConfig(out=args.out, max_steps=args.steps, batch_size=args.batch, grad_accum=args.grad_accum,
                      lr=args.lr, warmup_steps=args.warmup, mixed_precision=args.mixed_precision, seed=args.seed,
                      checkpoint_every=args.checkpoint_every, log_every=args.log_every, progress=not args.quiet,
                      time_limit_minutes=args.time_limit)
    if check_out(args, cfg, "vae"):  # resumed a finished run: nothing to do
        return 0
    if args.init:
        vae = load_vae(args.init)  # a folder, "default" or a Hugging Face id (llcm.pipeline.resolve_model)
        source = {"init": model_record(args.init)}
    else:
        preset = load_preset(args.preset)
        if not preset.get("vae"):
            raise UserError(f"preset {args.preset!r} has no 'vae' config to build; use --preset tiny-cpu "
                            "or start from a VAE folder with --init")
        vae = build_vae(preset["vae"], seed=args.seed)
        source = {"preset": record_name(args.preset)}
    f = vae_factor(vae)
    train_split = scan_split(args.data, "train", f)
    eval_split = None
    meta = train_split.root / args.eval_split / "metadata.jsonl"
    if meta.is_file() and meta.read_text().strip() and args.eval_split != "train":  # an empty split: train only
        eval_split = scan_split(args.data, args.eval_split, f)
        if (eval_split.height, eval_split.width) != (train_split.height, train_split.width):
            raise UserError(f"the {args.eval_split} images are {eval_split.width}x{eval_split.height} but the train "
                            f"images are {train_split.width}x{train_split.height}")
    extra = {"command": "vae", "data": record_name(args.data), "data_hash": train_split.data_hash,
             "train_images": len(train_split),
             "eval_split": eval_split.split if eval_split else "train (no test split)",
             "image_size": [train_split.height, train_split.width], "kl_weight": kl_weight,
             "hard_pixel_weight": args.hard_pixel_weight, "anchor": args.anchor and record_name(args.anchor),
             "anchor_weight": args.anchor_weight,
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
        source = {**source, "anchor": record_name(args.anchor), "anchor_data_hash": anchor_split.data_hash}
    anchor_z = None
    if args.anchor_model:
        anchor_z = anchor_samples(args.anchor_model, vae, args.anchor_samples, args.seed,
                                 (train_split.height, train_split.width))
        source = {**source, "anchor_model": model_record(args.anchor_model),
                  "anchor_samples_per_class": args.anchor_samples}
    task = VAETask(vae, train_px, eval_px, eval_split.split if eval_split else "train", kl_weight=kl_weight,
                   steps=args.steps, standardize_latents=args.standardize_latents,
                   hard_pixel_weight=args.hard_pixel_weight, anchor_pixels=anchor_px, anchor_weight=args.anchor_weight,
                   anchor_latents=anchor_z,
                   source={"data": record_name(args.data), "data_hash": train_split.data_hash, **source})
    try:
        summary = train(task, cfg, resume=args.resume, extra_config=extra, overwrite=args.overwrite)
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


# ------------------------------------------------------------------------------------------ teacher

TEACHER_HELP = """\
Retrain a Stable-Diffusion-style latent diffusion teacher on cached latents + prompts (the paper's
"retrained SD"): epsilon or v prediction as the base model has, prompt dropout for classifier-free
guidance, full fine-tune or LoRA (--lora-rank).

examples:
  llcm train teacher --latents data/mini-latents --model runs/vae/model --out runs/teacher
  llcm train teacher --latents lat/ --base ~/models/sd15 --preset sd15 --lora-rank 64 --out runs/t
"""


def register_teacher(train_sub) -> None:
    d = training_defaults(None, "teacher")
    p = train_sub.add_parser("teacher", help="retrain a latent diffusion teacher", description=TEACHER_HELP,
                             epilog=LOOP_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--latents", required=True, help="latent cache from `llcm encode`")
    p.add_argument("--base", default=None, help="diffusers SD folder to fine-tune, or a Hugging Face id "
                   "org/name[@revision] already in the local HF cache (default: build the preset's tiny UNet "
                   "from scratch)")
    p.add_argument("--model", default=None, help="a model folder whose VAE/text encoder to use with a fresh tiny "
                   "UNet (e.g. the output of `llcm train vae` plus the preset's text encoder); the UNet is built "
                   "for the VAE's latent channels")
    p.add_argument("--cond-dropout", type=float, default=0.1, help="prompt dropout for CFG (default 0.1)")
    p.add_argument("--lora-rank", type=int, default=0, help="train LoRA adapters of this rank instead of all weights")
    p.add_argument("--train-text-encoder", action="store_true",
                   help="train the text encoder with the UNet (full fine-tune only): needed when it starts from "
                        "random weights, as the tiny preset's does, so that prompts differing in one word "
                        "(normal / nodule) condition differently")
    add_loop_options(p, d)
    p.set_defaults(func=run_teacher)


def teacher_components(args):
    """The teacher's starting point: a local SD folder, or the preset's tiny architecture (+ a trained VAE)."""
    import dataclasses

    from llcm.models import components_from_preset, load_components
    from llcm.pipeline import resolve_model
    from llcm.presets import load_preset

    if args.base:
        return load_components(resolve_model(args.base))
    preset = load_preset(args.preset)
    vae = None
    if args.model:
        from diffusers import AutoencoderKL

        folder = resolve_model(args.model)
        vae_dir = folder / "vae" if (folder / "vae").exists() else folder
        if not (vae_dir / "config.json").exists():
            raise UserError(f"{args.model} has no VAE (expected {vae_dir}/config.json)")
        vae = AutoencoderKL.from_pretrained(vae_dir, local_files_only=True)
        channels = int(vae.config.latent_channels)
        unet_cfg = preset.get("unet") or {}
        if preset.get("source") == "configs" and unet_cfg.get("in_channels", channels) != channels:
            # the fresh tiny UNet is built for the VAE's latents (e.g. a VAE trained with more channels)
            print(f"note: the VAE has {channels} latent channels; building the {preset.get('name')} UNet with "
                  f"{channels} input/output channels (preset: {unet_cfg['in_channels']})")
            preset["unet"] = {**unet_cfg, "in_channels": channels, "out_channels": channels}
    comps = components_from_preset(preset, None, seed=args.seed)
    if vae is not None:
        comps = dataclasses.replace(comps, vae=vae, scaling_factor=float(vae.config.scaling_factor))
    return comps


def run_teacher(args) -> int:
    from llcm.tasks import TeacherTask

    d = training_defaults(args.preset, "teacher")
    cfg = prepare_run(args, d, "teacher")
    if cfg is None:  # resumed a finished run: nothing to do
        return 0
    require_folder(args.latents, "latent cache", "create it with `llcm encode`")
    comps = teacher_components(args)
    data = load_latents(args.latents, comps)
    if not args.base and data.latents.shape[-1] != comps.unet.config.sample_size:
        # a fresh UNet records the latent size it is trained at: pipelines take their default image size from it
        comps.unet.register_to_config(sample_size=int(data.latents.shape[-1]))
    return run_training(lambda: TeacherTask(comps, data, cond_dropout=args.cond_dropout, lora_rank=args.lora_rank,
                                    train_text_encoder=args.train_text_encoder),
                        args, cfg, "teacher")


# ------------------------------------------------------------------------------------------ dreambooth

DB_HELP = """\
DreamBooth-style baseline: fine-tune the teacher on ONE class's training latents with an instance prompt
("sks <class prompt>" by default) plus prior preservation: class latents sampled once from the frozen
original teacher with the class prompt; loss = instance denoising loss + lambda * prior denoising loss.
--class all trains one model per class into OUT/<class>/ and writes OUT/dreambooth.json, which
`llcm evaluate --model db=OUT:ddim@50` reads (each class sampled by its own model and instance prompt).

examples:
  llcm train dreambooth --teacher runs/teacher/model --latents lat/train --class all --out runs/db
  llcm train dreambooth --teacher runs/teacher/model --latents lat/train --class chest-xray-normal --out runs/db
"""


def register_dreambooth(train_sub) -> None:
    d = {"steps": 400, "batch": 8, "lr": 5e-5}
    p = train_sub.add_parser("dreambooth", help="DreamBooth-style per-class fine-tune of the teacher (baseline)",
                             description=DB_HELP, epilog=LOOP_HELP,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="teacher model folder (or a Hugging Face id in the local cache)")
    p.add_argument("--latents", required=True, help="latent cache of the train split (the teacher's VAE)")
    p.add_argument("--class", dest="classes", required=True, help="class name or prompt; comma-separated; 'all'")
    p.add_argument("--instance-prompt", choices=["rare", "class"], default="rare",
                   help="rare: '<rare token> <class prompt>' (DreamBooth); class: the class prompt itself")
    p.add_argument("--rare-token", default="sks")
    p.add_argument("--num-prior", type=int, default=100, help="class-prior latents from the frozen teacher")
    p.add_argument("--prior-weight", type=float, default=1.0, help="lambda of the prior-preservation loss")
    p.add_argument("--prior-steps", type=int, default=25, help="DDIM steps for the prior latents")
    p.add_argument("--prior-w", type=float, default=6.5, help="CFG w (LCM form) for the prior latents")
    p.add_argument("--cond-dropout", type=float, default=0.1)
    add_loop_options(p, d)
    p.set_defaults(func=run_dreambooth, _db_defaults=d)


def run_dreambooth(args: argparse.Namespace) -> int:
    from llcm.dreambooth import DreamBoothTask, class_rows, slug, write_set_entry
    from llcm.models import load_components, model_hash
    from llcm.pipeline import model_record, resolve_model
    from llcm.training import refuse_overlap, train

    d = args._db_defaults
    loop_config(args, d).validate()
    refuse_overlap(args.out, input_folders(args))  # OUT holds one run per class: each is checked below
    teacher = resolve_model(args.teacher)
    probe = load_components(teacher)
    data = load_latents(args.latents, probe)
    teacher_hash = model_hash(probe)
    del probe
    wanted = list(dict.fromkeys(data.meta.get("classes") or data.prompts)) if args.classes == "all" \
        else [c.strip() for c in args.classes.split(",") if c.strip()]
    names = [class_rows(data, c)[1] for c in wanted]  # validates every class before any training
    out = Path(args.out)
    todo = []
    for name in names:  # every class's folder is checked before any is trained
        sub = out / slug(name)
        done = sub / "summary.json"
        if (done.is_file() and json.loads(done.read_text()).get("status") == "finished" and not args.dry_run
                and not args.overwrite):
            print(f"dreambooth {name}: already trained ({sub / 'model'})")
            continue
        cfg = loop_config(args, d)
        cfg.out = str(sub)
        if not check_out(args, cfg, "dreambooth"):
            todo.append((name, cfg))
    status = 0
    for name, cfg in todo:
        sub = Path(cfg.out)
        comps = load_components(teacher)  # a fresh teacher for every class
        class_prompt = class_rows(data, name)[2]
        task = DreamBoothTask(comps, data, name, instance_prompt=None if args.instance_prompt == "rare" else
                              class_prompt, rare_token=args.rare_token, num_prior=args.num_prior,
                              prior_weight=args.prior_weight, prior_steps=args.prior_steps, prior_w=args.prior_w,
                              cond_dropout=args.cond_dropout, seed=args.seed)
        extra = {"command": "dreambooth", "dreambooth": task.record(),
                 "args": recorded_args(args, ("func", "_db_defaults"))}
        summary = train(task, cfg, resume=args.resume, dry_run=args.dry_run, extra_config=extra,
                        overwrite=args.overwrite)
        if args.dry_run:
            continue
        print(f"dreambooth {name}: {outcome(summary)}")
        if summary["status"] == "finished":
            write_set_entry(out, task, sub / "model", model_record(args.teacher), teacher_hash)
        else:
            status = 1
    return status


def register(sub) -> None:
    group = train_subparsers(sub)
    register_vae(group)
    register_teacher(group)
    register_dreambooth(group)
