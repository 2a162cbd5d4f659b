"""What every training command shares: the `train` group, the loop options, latents checks, the run."""

from __future__ import annotations

import argparse
from pathlib import Path

from llcm.errors import UserError
_ATTR = "_llcm_train_subparsers"

DESCRIPTION = """\
Train a model with llcm's one training loop (accelerate, checkpoints every N steps, --resume,
metrics.jsonl, a sample grid at the end). The final model goes to OUT/model.
"""


def train_subparsers(sub: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """The sub-subparsers of `llcm train`, created on the first call and the same object afterwards."""
    existing = getattr(sub, _ATTR, None)
    if existing is not None:
        return existing
    parser = sub.add_parser("train", help="train a model: vae, teacher, ...", description=DESCRIPTION,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_subparsers(dest="train_command", metavar="WHAT")
    parser.set_defaults(func=lambda args: (parser.print_help(), 0)[1])
    setattr(sub, _ATTR, group)
    return group


def add_model_options(p: argparse.ArgumentParser) -> None:
    """--model and --adapter, as generate and serve take them."""
    p.add_argument("--model", default=None,
                   help="a local model folder (llcm or diffusers LCM format, or an adapter folder from `llcm "
                        "finetune --lora-rank`), 'default' (the model shipped with llcm), a Hugging Face id "
                        "org/name[@revision] already in the local HF cache (never downloaded; a local folder of "
                        "that name wins) or a preset name; default: the shipped model. With --adapter: the base "
                        "to apply it to")
    p.add_argument("--adapter", default=None, metavar="FOLDER",
                   help="an adapter folder from `llcm finetune --lora-rank`: merged into a copy of the base in "
                        "memory (the base's files are only read). The base is --model, else the one the adapter "
                        "records; a base whose UNet hash differs from the recorded one is refused")


LOOP_HELP = """\
every training: checkpoints (safetensors) every --checkpoint-every steps and on Ctrl-C/SIGTERM;
--resume continues from the latest intact one bit-for-bit (a finished run: nothing to do); a non-empty
OUT is refused unless --resume continues the same command's run there or --overwrite replaces it, and
OUT is never an input folder, inside one or around one; metrics.jsonl (+ TensorBoard if installed) and
sample grids in OUT; the final model in OUT/model; --dry-run prints the resolved config and the
plan (parameters per network, memory per process, images per step) and stops, writing nothing.
Several processes: accelerate launch --num_processes N -m llcm.cli ... (same global --batch)."""


def add_run_options(g) -> None:
    """The options of every training run, teacher to VAE: precision, seed, checkpoints, resume, limits."""
    g.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no",
                   help="autocast dtype (accelerate). The trained network keeps fp32 weights, gradients and AdamW "
                        "moments; on a GPU the frozen networks that only run forward (distill's teacher, finetune's "
                        "replay base, a target with --ema 0) are held in this dtype too. "
                        "Default no")
    g.add_argument("--seed", type=int, default=0, help="seed of the initial weights, batches and noise (default 0)")
    g.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints (default 500)")
    g.add_argument("--resume", action="store_true", help="continue from the latest intact checkpoint in --out")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out (its checkpoints, model, samples, metrics); without it a "
                        "non-empty --out is refused unless --resume continues the same command's run there")
    g.add_argument("--time-limit", type=float, default=0.0, metavar="MINUTES",
                   help="stop after this much training time and save the model as if finished (default: none)")
    g.add_argument("--dry-run", action="store_true",
                   help="print the resolved configuration and the plan (parameters per network; memory per process "
                        "for weights, gradients, optimizer and activations, measured by one small forward+backward; "
                        "images per step) and exit; writes nothing")
    g.add_argument("--quiet", action="store_true", help="no progress bar (metrics.jsonl still records the run)")


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
    g.add_argument("--sample-every", type=int, default=0, help="sample grid every N steps (0: at the end)")
    g.add_argument("--gradient-checkpointing", action="store_true",
                   help="keep only the trained UNet's block inputs in the forward pass and recompute the rest in the "
                        "backward pass (diffusers' enable_gradient_checkpointing): far less activation memory, "
                        "about one more forward of the student per step (--dry-run shows both)")
    add_run_options(g)
    g.add_argument("--preset", default="tiny-cpu", help="named preset for defaults and the tiny architecture "
                   "(tiny-cpu, sd15, sd21-base)")


def loop_config(args: argparse.Namespace, defaults: dict):
    from llcm.training import TrainConfig

    given = lambda v, key: defaults[key] if v is None else v  # noqa: E731  (0 is a value, refused by validate)
    return TrainConfig(out=args.out, max_steps=given(args.steps, "steps"), batch_size=given(args.batch, "batch"),
                       grad_accum=args.grad_accum, lr=given(args.lr, "lr"), weight_decay=args.weight_decay,
                       warmup_steps=args.warmup, lr_schedule=args.lr_schedule or defaults.get("lr_schedule", "constant"),
                       mixed_precision=args.mixed_precision, seed=args.seed,
                       gradient_checkpointing=getattr(args, "gradient_checkpointing", False),
                       checkpoint_every=args.checkpoint_every, sample_every=args.sample_every,
                       time_limit_minutes=getattr(args, "time_limit", 0.0), progress=not getattr(args, "quiet", False))


def require_folder(path: str, what: str, hint: str) -> None:
    if not Path(path).is_dir():
        raise UserError(f"{what} {path} does not exist; {hint}")


def load_latents(path: str, components):
    from llcm.latents import LatentSet
    from llcm.models import model_hash

    if not Path(path).exists():
        raise UserError(f"latent cache {path} does not exist; create it with `llcm encode`")
    return LatentSet.load(path, expect_vae_hash=model_hash(components.vae))


# the options of the training commands that name a model (a folder, "default" or a Hugging Face id)
MODEL_OPTIONS = ("model", "base", "teacher", "student", "init", "anchor_model")


def recorded_args(args: argparse.Namespace, skip: tuple[str, ...] = ("func",)) -> dict:
    """The options as a run's config.json records them: a path given as absolute by its folder's name only, a
    Hugging Face id pinned to the commit it resolved to (llcm.pipeline.model_record)."""
    from llcm.fileio import record_name
    from llcm.pipeline import model_record

    return {k: (model_record(v) if k in MODEL_OPTIONS else record_name(v)) if isinstance(v, str) else v
            for k, v in vars(args).items() if k not in skip}


# the options of the training commands that name folders a run reads: --out may never be, hold or lie in one
INPUT_OPTIONS = ("model", "base", "teacher", "student", "latents", "replay_latents", "init", "data", "anchor",
                 "anchor_model")


def input_folders(args: argparse.Namespace) -> dict[str, str]:
    from llcm.pipeline import resolve_model

    found = {}
    for name in INPUT_OPTIONS:
        value = getattr(args, name, None)
        if isinstance(value, str):
            try:
                found[f"--{name.replace('_', '-')}"] = str(resolve_model(value))  # "default": the shipped model
            except UserError:
                pass
    return found


def check_out(args: argparse.Namespace, cfg, command: str) -> bool:
    """What every training command checks first, before loading or writing anything: the loop's numbers
    (TrainConfig.validate) and the run folder cfg.out (llcm.training.check_run_folder). True when --resume
    finds the run already finished: it says so, and the command has nothing to do."""
    from llcm.training import check_run_folder

    cfg.validate()
    note = check_run_folder(cfg.out, command, max_steps=cfg.max_steps, resume=args.resume, overwrite=args.overwrite,
                            inputs=input_folders(args))
    if note:
        print(note)
    return note is not None


def prepare_run(args: argparse.Namespace, defaults: dict, command: str):
    """The loop configuration of a training command, checked with its run folder (check_out); None when the
    run is already finished."""
    cfg = loop_config(args, defaults)
    return None if check_out(args, cfg, command) else cfg


def outcome(summary: dict) -> str:
    """'finished at step 40, loss 0.1234' (no loss when no step ran)."""
    loss = "" if summary.get("loss") is None else f", loss {summary['loss']:.4g}"
    return f"{summary['status']} at step {summary['step']}{loss}"


def run_training(task_factory, args, cfg, section):
    from llcm.training import train

    task = task_factory()
    extra = {"command": section, "args": recorded_args(args)}
    try:
        summary = train(task, cfg, resume=args.resume, dry_run=args.dry_run, extra_config=extra,
                        overwrite=args.overwrite)
    except FloatingPointError as exc:  # the loop's NaN guard: its message says what to do
        raise UserError(str(exc)) from None
    if not args.dry_run:
        print(f"{section}: {outcome(summary)}; model: {summary.get('model', '-')}")
    return 0 if summary.get("status", "finished") in ("finished", "interrupted") or args.dry_run else 1


def consistency_options(p, d) -> None:
    p.add_argument("--k", type=int, default=None, help=f"skipping interval (default {d['k']})")
    p.add_argument("--w-min", type=float, default=None, help=f"lowest guidance w, LCM form (default {d['w_min']})")
    p.add_argument("--w-max", type=float, default=None, help=f"highest guidance w (default {d['w_max']})")
    p.add_argument("--ema", type=float, default=None, help=f"EMA rate of the target network (default {d['ema_decay']})")
    p.add_argument("--loss", choices=["huber", "l2"], default=None, help=f"distance (default {d['loss']})")
    p.add_argument("--huber-c", type=float, default=None, help=f"pseudo-Huber c (default {d['huber_c']})")
    p.add_argument("--lora-rank", type=int, default=0, help="LCM-LoRA style: train LoRA adapters only")
    add_loop_options(p, d)


def consistency_kwargs(args, d) -> dict:
    pick = lambda v, k: d[k] if v is None else v  # noqa: E731
    return dict(k=pick(args.k, "k"), w_min=pick(args.w_min, "w_min"), w_max=pick(args.w_max, "w_max"),
                ema_decay=pick(args.ema, "ema_decay"), metric=pick(args.loss, "loss"),
                huber_c=pick(args.huber_c, "huber_c"), lora_rank=args.lora_rank)
