"""`llcm train teacher`, `llcm distill`, `llcm finetune`: thin CLI over llcm.tasks + llcm.training."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from llcm.errors import UserError

LOOP_HELP = """\
every training: checkpoints (safetensors) every --checkpoint-every steps and on Ctrl-C/SIGTERM;
--resume continues from the latest one bit-for-bit; metrics.jsonl (+ TensorBoard if installed) and
sample grids in OUT; the final model in OUT/model; --dry-run prints the resolved config and stops.
Several processes: accelerate launch --num_processes N -m llcm.cli ... (same global --batch)."""


def add_loop_options(p: argparse.ArgumentParser, defaults: dict) -> None:
    g = p.add_argument_group("training loop")
    g.add_argument("--out", required=True, help="run folder (config, checkpoints, samples, model)")
    g.add_argument("--steps", type=int, default=None, help=f"optimizer steps (preset default: {defaults['steps']})")
    g.add_argument("--batch", type=int, default=None, help=f"global batch size (default {defaults['batch']})")
    g.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation micro-batches")
    g.add_argument("--lr", type=float, default=None, help=f"learning rate (default {defaults['lr']})")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--warmup", type=int, default=0, help="linear warm-up steps")
    g.add_argument("--lr-schedule", choices=["constant", "cosine"], default=None,
                   help=f"learning rate after the warm-up: constant, or a cosine to 0 at the last step "
                        f"(default {defaults.get('lr_schedule', 'constant')})")
    g.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--checkpoint-every", type=int, default=500)
    g.add_argument("--sample-every", type=int, default=0, help="sample grid every N steps (0: at the end)")
    g.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    g.add_argument("--time-limit", type=float, default=0.0, metavar="MINUTES",
                   help="stop after this much training time and save the model as if finished (default: none)")
    g.add_argument("--dry-run", action="store_true", help="print the configuration and exit")
    g.add_argument("--quiet", action="store_true", help="no progress bar (metrics.jsonl still records the run)")
    g.add_argument("--preset", default="tiny-cpu", help="named preset for defaults and the tiny architecture "
                   "(tiny-cpu, sd15, sd21-base)")


def loop_config(args: argparse.Namespace, defaults: dict):
    from llcm.training import TrainConfig

    given = lambda v, key: defaults[key] if v is None else v  # noqa: E731  (0 is a value, refused by validate)
    return TrainConfig(out=args.out, max_steps=given(args.steps, "steps"), batch_size=given(args.batch, "batch"),
                       grad_accum=args.grad_accum, lr=given(args.lr, "lr"), weight_decay=args.weight_decay,
                       warmup_steps=args.warmup, lr_schedule=args.lr_schedule or defaults.get("lr_schedule", "constant"),
                       mixed_precision=args.mixed_precision, seed=args.seed,
                       checkpoint_every=args.checkpoint_every, sample_every=args.sample_every,
                       time_limit_minutes=getattr(args, "time_limit", 0.0), progress=not getattr(args, "quiet", False))


def preset_defaults(name: str | None, section: str) -> dict:
    """Training defaults of a preset section ("teacher", "distill", "finetune"), with llcm's fallbacks.

    name=None gives those of the default preset (tiny-cpu) without importing torch, for --help.
    """
    if name is None:
        from importlib.resources import files

        preset = json.loads((files("llcm") / "configs" / "tiny-cpu.json").read_text(encoding="utf-8"))
    else:
        from llcm.models import load_preset

        preset = load_preset(name)
    sec = preset.get(section, {})
    base = {"teacher": {"steps": 2000, "batch": 64, "lr": 2e-4},
            "distill": {"steps": 1000, "batch": 32, "lr": 1e-4},
            "finetune": {"steps": 500, "batch": 32, "lr": 5e-5}}[section]
    return {
        "steps": sec.get("steps", base["steps"]), "batch": sec.get("global_batch_size", base["batch"]),
        "lr": sec.get("learning_rate", base["lr"]), "ema_decay": sec.get("ema_decay", 0.95),
        "k": sec.get("skipping_interval_k", 20), "w_min": sec.get("w_min", 5.0), "w_max": sec.get("w_max", 15.0),
        "huber_c": sec.get("huber_c", 0.001), "loss": sec.get("loss", "huber"), "preset": preset,
        "lr_schedule": sec.get("lr_schedule", "constant"),
    }


def _require_folder(path: str, what: str, hint: str) -> None:
    if not Path(path).is_dir():
        raise UserError(f"{what} {path} does not exist; {hint}")


def _load_latents(path: str, components):
    from llcm.latents import LatentSet
    from llcm.models import model_hash

    if not Path(path).exists():
        raise UserError(f"latent cache {path} does not exist; create it with `llcm encode`")
    return LatentSet.load(path, expect_vae_hash=model_hash(components.vae))


def _run(task_factory, args, defaults, section):
    from llcm.training import train

    cfg = loop_config(args, defaults)
    task = task_factory()
    extra = {"command": section, "args": {k: v for k, v in vars(args).items() if k != "func"}}
    summary = train(task, cfg, resume=args.resume, dry_run=args.dry_run, extra_config=extra)
    if not args.dry_run:
        print(f"{section}: {summary['status']} at step {summary['step']}, loss {summary['loss']:.4g}; "
              f"model: {summary.get('model', '-')}")
    return 0 if summary.get("status", "finished") in ("finished", "interrupted") or args.dry_run else 1


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
    d = preset_defaults(None, "teacher")
    p = train_sub.add_parser("teacher", help="retrain a latent diffusion teacher", description=TEACHER_HELP,
                             epilog=LOOP_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--latents", required=True, help="latent cache from `llcm encode`")
    p.add_argument("--base", default=None, help="local diffusers SD folder to fine-tune (default: build the "
                   "preset's tiny UNet from scratch)")
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

    from llcm.models import components_from_preset, load_components, load_preset

    if args.base:
        return load_components(args.base)
    preset = load_preset(args.preset)
    vae = None
    if args.model:
        from diffusers import AutoencoderKL

        folder = Path(args.model)
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

    d = preset_defaults(args.preset, "teacher")
    _require_folder(args.latents, "latent cache", "create it with `llcm encode`")
    comps = teacher_components(args)
    data = _load_latents(args.latents, comps)
    if not args.base and data.latents.shape[-1] != comps.unet.config.sample_size:
        # a fresh UNet records the latent size it is trained at: pipelines take their default image size from it
        comps.unet.register_to_config(sample_size=int(data.latents.shape[-1]))
    return _run(lambda: TeacherTask(comps, data, cond_dropout=args.cond_dropout, lora_rank=args.lora_rank,
                                    train_text_encoder=args.train_text_encoder),
                args, d, "teacher")


# ------------------------------------------------------------------------------------------ distill

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
    d = preset_defaults(None, "distill")
    p = sub.add_parser("distill", help="latent consistency distillation (LLCM / LCM)", description=DISTILL_HELP,
                       epilog=LOOP_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="teacher model folder (llcm or diffusers SD format)")
    p.add_argument("--latents", required=True, help="latent cache from `llcm encode` (same VAE as the teacher)")
    _consistency_options(p, d)
    p.add_argument("--solver", default="leapfrog", help="ODE solver: leapfrog, ddim, midpoint, dpmpp")
    p.add_argument("--student", default=None, metavar="LLCM_FOLDER",
                   help="start the student from this trained LLCM/LCM instead of the teacher's weights (e.g. "
                        "carry a finished distillation over to a teacher fine-tuned on a new VAE)")
    p.set_defaults(func=run_distill)


def _consistency_options(p, d) -> None:
    p.add_argument("--k", type=int, default=None, help=f"skipping interval (default {d['k']})")
    p.add_argument("--w-min", type=float, default=None, help=f"lowest guidance w, LCM form (default {d['w_min']})")
    p.add_argument("--w-max", type=float, default=None, help=f"highest guidance w (default {d['w_max']})")
    p.add_argument("--ema", type=float, default=None, help=f"EMA rate of the target network (default {d['ema_decay']})")
    p.add_argument("--loss", choices=["huber", "l2"], default=None, help=f"distance (default {d['loss']})")
    p.add_argument("--huber-c", type=float, default=None, help=f"pseudo-Huber c (default {d['huber_c']})")
    p.add_argument("--lora-rank", type=int, default=0, help="LCM-LoRA style: train LoRA adapters only")
    add_loop_options(p, d)


def _cons_kwargs(args, d) -> dict:
    pick = lambda v, k: d[k] if v is None else v  # noqa: E731
    return dict(k=pick(args.k, "k"), w_min=pick(args.w_min, "w_min"), w_max=pick(args.w_max, "w_max"),
                ema_decay=pick(args.ema, "ema_decay"), metric=pick(args.loss, "loss"),
                huber_c=pick(args.huber_c, "huber_c"), lora_rank=args.lora_rank)


def run_distill(args) -> int:
    from llcm.models import load_components
    from llcm.solvers import SOLVERS
    from llcm.tasks import DistillTask

    if args.solver not in SOLVERS:
        raise UserError(f"unknown solver {args.solver!r}; choose from {', '.join(SOLVERS)}")
    d = preset_defaults(args.preset, "distill")
    _require_folder(args.latents, "latent cache", "create it with `llcm encode`")
    teacher = load_components(args.teacher)
    student = None
    if args.student:
        if args.lora_rank:
            raise UserError("--student starts from a full LLCM UNet; it cannot be combined with --lora-rank")
        student = load_components(args.student).unet
    data = _load_latents(args.latents, teacher)
    return _run(lambda: DistillTask(teacher, data, solver=args.solver, student=student, **_cons_kwargs(args, d)),
                args, d, "distill")


# ------------------------------------------------------------------------------------------ finetune

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

--model is a model folder, 'default' (the model shipped with llcm) or the OUT/model of an earlier
finetune, full or adapter. Its files are only read.

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

    d = preset_defaults(None, "finetune")
    p = sub.add_parser("finetune", help="latent consistency fine-tuning (LCF) on a new dataset",
                       description=FINETUNE_HELP, epilog=LOOP_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a trained LLCM folder, 'default', or an adapter folder")
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
    _consistency_options(p, d)
    p.set_defaults(func=run_finetune)


def run_finetune(args) -> int:
    import json

    from llcm.adapter import base_spec
    from llcm.models import load_components
    from llcm.pipeline import resolve_model
    from llcm.replay import CACHE, check_fraction, load_or_sample
    from llcm.tasks import FinetuneTask

    d = preset_defaults(args.preset, "finetune")
    check_fraction(args.replay)
    if args.merge and not args.lora_rank:
        raise UserError("--merge only applies to --lora-rank (a full fine-tune always writes a full model)")
    _require_folder(args.latents, "latent cache", "create it with `llcm encode`")
    folder = resolve_model(args.model)
    model = load_components(folder)
    cfg_file = folder / "llcm.json"
    cfg = json.loads(cfg_file.read_text()) if cfg_file.exists() else {}
    # keep the model's own w range (and its k, unless the preset sets LCF's own) unless overridden
    k = d["k"] if "skipping_interval_k" in d["preset"].get("finetune", {}) else cfg.get("k", d["k"])
    d = {**d, "k": k, "w_min": cfg.get("w_min", d["w_min"]), "w_max": cfg.get("w_max", d["w_max"])}
    data = _load_latents(args.latents, model)  # another VAE's latents are refused here, before OUT exists
    replay, cache = None, None
    if args.replay > 0 and args.replay_latents:
        _require_folder(args.replay_latents, "replay latent cache", "give the base model's training latents")
        replay = _load_latents(args.replay_latents, model)
        replay.meta["origin"] = str(Path(args.replay_latents).resolve())
    elif args.replay > 0 and not args.dry_run:
        cache = Path(args.out) / CACHE
        replay, fresh = load_or_sample(cache, model, cfg, tuple(data.latents.shape[1:]), args.replay_per_class,
                                       args.seed)
        cache = cache if fresh else None
    base = None if args.merge else base_spec(args.model)
    return _run(lambda: FinetuneTask(model, data, **_cons_kwargs(args, d), adapter_base=base, replay=replay,
                                     replay_fraction=args.replay, replay_cache=cache, k_start=args.k_start,
                                     k_ramp=args.k_ramp, base_grayscale=cfg.get("grayscale", [])),
                args, d, "finetune")


def register(sub) -> None:
    from llcm.commands_train import train_subparsers

    register_teacher(train_subparsers(sub))
    register_distill(sub)
    register_finetune(sub)
