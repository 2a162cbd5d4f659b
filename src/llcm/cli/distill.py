"""`llcm distill` (latent consistency distillation) and `llcm finetune` (LCF): thin CLI over llcm.tasks."""

from __future__ import annotations

import argparse
from pathlib import Path

from llcm.cli.options import (LOOP_HELP, consistency_kwargs, consistency_options, load_latents, prepare_run,
                              require_folder, run_training)
from llcm.errors import UserError
from llcm.presets import training_defaults

DISTILL_HELP = """\
Latent consistency distillation (LLCM): a student initialised from the teacher's UNet plus a
guidance-scale (w) embedding learns f(z_t) = f(z_hat_s) where z_hat_s = one solver jump of k
steps on the frozen teacher with CFG (eq. 14). The target network is an EMA of the student.

solvers: leapfrog (the paper's step; identical to ddim, i.e. plain LCM), ddim, midpoint (second-order
leapfrog-family, 2 teacher calls), dpmpp (DPM-Solver++ 2S). See docs/solvers.md.

examples:
  llcm distill --teacher runs/teacher/model --latents data/mini-latents --out runs/llcm
  llcm distill --teacher runs/teacher/model --latents lat/ --solver midpoint --k 20 --w-min 2 --w-max 8 --out runs/m
  llcm distill --teacher ~/models/sd15 --preset sd15 --latents lat/ --out runs/sd15-llcm   (paper defaults)
"""


def register_distill(sub) -> None:
    d = training_defaults(None, "distill")
    p = sub.add_parser("distill", help="latent consistency distillation (LLCM / LCM)", description=DISTILL_HELP,
                       epilog=LOOP_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="teacher model folder (llcm or diffusers SD format), or a "
                   "Hugging Face id org/name[@revision] already in the local HF cache")
    p.add_argument("--latents", required=True, help="latent cache from `llcm encode` (same VAE as the teacher)")
    consistency_options(p, d)
    p.add_argument("--solver", default="leapfrog", help="ODE solver: leapfrog, ddim, midpoint, dpmpp")
    p.add_argument("--student", default=None, metavar="LLCM_FOLDER",
                   help="start the student from this trained LLCM/LCM instead of the teacher's weights (e.g. "
                        "carry a finished distillation over to a teacher fine-tuned on a new VAE)")
    p.set_defaults(func=run_distill)


def run_distill(args) -> int:
    from llcm.models import load_components
    from llcm.pipeline import resolve_model
    from llcm.solvers import SOLVERS
    from llcm.tasks import DistillTask

    if args.solver not in SOLVERS:
        raise UserError(f"unknown solver {args.solver!r}; choose from {', '.join(SOLVERS)}")
    d = training_defaults(args.preset, "distill")
    cfg = prepare_run(args, d, "distill")
    if cfg is None:  # resumed a finished run: nothing to do
        return 0
    require_folder(args.latents, "latent cache", "create it with `llcm encode`")
    teacher = load_components(resolve_model(args.teacher))
    student = None
    if args.student:
        if args.lora_rank:
            raise UserError("--student starts from a full LLCM UNet; it cannot be combined with --lora-rank")
        student = load_components(resolve_model(args.student)).unet
    data = load_latents(args.latents, teacher)
    return run_training(lambda: DistillTask(teacher, data, solver=args.solver, student=student, **consistency_kwargs(args, d)),
                        args, cfg, "distill")


FINETUNE_HELP = """\
Latent consistency fine-tuning (LCF, LLCM Algorithm 1): adapt a trained LLCM to a new dataset with
no teacher. The same noise places each latent at t_n and t_(n+k); the student at t_(n+k) learns to
match the EMA target at t_n.

Defaults (preset tiny-cpu, the shipped model's size): lr 1e-3 decayed to 0 by a cosine, EMA 0 (the
target is the student itself), k 200 (so the result samples in at most 5 steps; --k 100 allows 10),
2000 steps x 32 (about 12 min on 2 CPU cores), pseudo-Huber loss, replay 0.25. Why: without a teacher
the new images enter only where t_n = 0 and climb the k-grid one interval per update; with the paper's
k 20 / EMA 0.95 / lr 5e-5 the default model learnt nothing of unseen ultrasound in 200-300 steps, while
EMA 0 / lr 1e-3 and the coarser grid were the best of 30 settings measured on it, and the decaying rate
took 16 more off the FID (bench/lcf_sweep.py, docs/adapt.md): unseen ultrasound's 4-step FID goes 322
zero-shot -> 203 with the defaults, 195 with --replay 0. --preset sd15 keeps the paper's settings
(lr 8e-6, EMA 0.95, k 20, batch 1024). --k-start K0 adds a curriculum (K0 shrinking to k over
--k-ramp of the run); it did not help here, so it is off by default.

A prompt whose training images are grayscale (measured by `llcm encode`) is recorded in the model's
llcm.json "grayscale" list, with the base's, and is drawn as luminance (llcm generate --keep-colour
keeps the RGB samples).

--model is a model folder, 'default' (the model shipped with llcm), the OUT/model of an earlier
finetune, full or adapter, or a Hugging Face id org/name[@revision] in the local HF cache. Its files are
only read.

--lora-rank R trains LoRA adapters (and the w-embedding) only, and OUT/model is then a small adapter
folder (adapter.safetensors + llcm.json naming the base and its UNet hash), not a copy of the UNet: one
base can carry several adapters. generate, evaluate, serve, encode and finetune take the adapter folder
as --model (it is merged into a copy of its base in memory); generate and serve also take
--model BASE --adapter FOLDER. A further finetune on an adapter folder trains on the merged model:
with --lora-rank its new adapter names the first one as its base (adapters chain); without, it writes
a full model. --merge writes the merged full model instead of the adapter.

--replay F (default 0.25) keeps the base's classes: a share F of every batch is replay latents with
their prompts, from --replay-latents (the base's training latent cache, encoded with the same VAE) or,
without it, sampled by the base itself at the start of the run (4 steps, --replay-per-class per class
of its llcm.json, seeded from --seed) and cached in OUT/replay, so --resume reuses them. On those rows
the model's output is held to the frozen base's at the same noisy point (output distillation), so the
old classes stay where they were at every t. Measured after 2000 steps on ultrasound: the 10 original
classes' 4-step FID 209.3 -> 219.9 and classifier 72.0% -> 65.7% with 0.25, against 285.5 and 10.0%
with --replay 0; the new class's FID 203.4 instead of 195.2. --replay 0 learns the new data alone.

examples:
  llcm encode --data data/dog-xray --model default --out lat/dog
  llcm finetune --model default --latents lat/dog --out runs/llcm-dog
  llcm finetune --model default --latents lat/dog --lora-rank 8 --out runs/lcf-dog      (a small adapter)
  llcm generate "dog thorax X-ray" --adapter runs/lcf-dog/model
  llcm finetune --model default --latents lat/dog --replay 0 --out runs/llcm-dog-only   (the new data alone)
  llcm finetune --model runs/llcm/model --latents lat/dog --replay 0.25 --replay-latents lat/train --out runs/r
"""


def register_finetune(sub) -> None:
    from llcm.replay import DEFAULT_FRACTION, PER_CLASS

    d = training_defaults(None, "finetune")
    p = sub.add_parser("finetune", help="latent consistency fine-tuning (LCF) on a new dataset",
                       description=FINETUNE_HELP, epilog=LOOP_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a trained LLCM folder, 'default', an adapter folder or a "
                   "Hugging Face id in the local HF cache")
    p.add_argument("--latents", required=True, help="latent cache of the new dataset (encoded with this model's VAE)")
    p.add_argument("--merge", action="store_true",
                   help="with --lora-rank: write the merged full model (loadable by diffusers alone) instead of "
                        "an adapter folder")
    p.add_argument("--replay", type=float, default=DEFAULT_FRACTION, metavar="F",
                   help=f"share of each batch drawn from replay latents of the base's classes, so they are not "
                        f"forgotten (0 <= F < 1; default {DEFAULT_FRACTION:g})")
    p.add_argument("--replay-latents", default=None, metavar="DIR",
                   help="the base model's training latent cache to replay (default: sample the base itself)")
    p.add_argument("--replay-per-class", type=int, default=PER_CLASS, metavar="N",
                   help=f"replay latents sampled per base class when --replay-latents is not given "
                        f"(default {PER_CLASS})")
    p.add_argument("--k-start", type=int, default=None, metavar="K0",
                   help="curriculum: start the skipping interval at K0 (up to the schedule length; wide "
                        "intervals are nearly plain denoising) and shrink it geometrically to --k over the "
                        "first --k-ramp of the run (default: no curriculum)")
    p.add_argument("--k-ramp", type=float, default=0.5, metavar="F",
                   help="share of the steps over which --k-start decays to --k (default 0.5)")
    consistency_options(p, d)
    p.set_defaults(func=run_finetune)


def run_finetune(args) -> int:
    from llcm.adapter import base_spec
    from llcm.fileio import record_name
    from llcm.model_folder import read_meta
    from llcm.models import load_components
    from llcm.pipeline import resolve_model
    from llcm.replay import CACHE, check_fraction, load_or_sample
    from llcm.tasks import FinetuneTask

    d = training_defaults(args.preset, "finetune")
    cfg_loop = prepare_run(args, d, "finetune")
    if cfg_loop is None:  # resumed a finished run: nothing to do
        return 0
    check_fraction(args.replay)
    if args.merge and not args.lora_rank:
        raise UserError("--merge only applies to --lora-rank (a full fine-tune always writes a full model)")
    require_folder(args.latents, "latent cache", "create it with `llcm encode`")
    folder = resolve_model(args.model)
    model = load_components(folder)
    cfg = read_meta(folder)
    # keep the model's own w range (and its k, unless the preset sets LCF's own) unless overridden
    k = d["k"] if "skipping_interval_k" in d["preset"].get("finetune", {}) else cfg.get("k", d["k"])
    d = {**d, "k": k, "w_min": cfg.get("w_min", d["w_min"]), "w_max": cfg.get("w_max", d["w_max"])}
    data = load_latents(args.latents, model)  # another VAE's latents are refused here, before OUT exists
    replay, cache = None, None
    if args.replay > 0 and args.replay_latents:
        require_folder(args.replay_latents, "replay latent cache", "give the base model's training latents")
        replay = load_latents(args.replay_latents, model)
        replay.meta["origin"] = record_name(args.replay_latents)  # with the cache's data_hash, not a path
    elif args.replay > 0 and not args.dry_run:
        cache = Path(args.out) / CACHE
        replay, fresh = load_or_sample(cache, model, cfg, tuple(data.latents.shape[1:]), args.replay_per_class,
                                       args.seed)
        cache = cache if fresh else None
    elif args.replay > 0:  # --dry-run samples nothing: the new latents stand in, so the plan holds the replay base
        replay = data
    base = None if args.merge else base_spec(args.model)
    return run_training(lambda: FinetuneTask(model, data, **consistency_kwargs(args, d), adapter_base=base, replay=replay,
                                     replay_fraction=args.replay, replay_cache=cache, k_start=args.k_start,
                                     k_ramp=args.k_ramp, base_grayscale=cfg.get("grayscale", [])),
                        args, cfg_loop, "finetune")


def register(sub) -> None:
    register_distill(sub)
    register_finetune(sub)
