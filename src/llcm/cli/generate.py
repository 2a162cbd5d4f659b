"""`llcm generate`: few-step generation to PNG files that record how they were made."""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

from llcm.cli.options import add_model_options
from llcm.errors import UserError
from llcm.presets import MAX_BATCH, MAX_SEED, MAX_SIZE, MAX_STEPS, MAX_W

HELP = f"""\
Generate medical images from text prompts with a latent consistency model in 1-8 steps (at most
{MAX_STEPS}, and one per point of the model's skipping grid: 1000 // k). Each PNG carries its prompt, seed,
step count, guidance w and the model hash in its metadata, so any single image can be regenerated;
a grid.png and generation.json sit beside them.

examples:
  llcm generate "axial brain MRI, T1-weighted"          default model, 4 steps, seed 0
  llcm generate "frontal chest X-ray with a lung nodule" --batch 8 --steps 2 --seed 100
  llcm generate --model runs/llcm/model --prompt "fundus photograph" --prompt "" --w 6
  llcm generate "x" --model tiny-cpu                    untrained tiny preset (plumbing check)
  llcm generate "dog thorax X-ray" --adapter runs/lcf-dog/model     an LCF adapter on the base it names
  llcm generate "dog thorax X-ray" --model default --adapter runs/lcf-dog/model

w is the guidance scale in LCM form (Stable Diffusion's guidance_scale = 1 + w); a value outside the
range the model was distilled with gets a warning (advice, not a limit); a negative, infinite, NaN or
larger than {MAX_W:g} is refused. An empty prompt "" is unconditional.
"""


def register(sub) -> None:
    p = sub.add_parser("generate", help="prompt -> images in 1-8 steps", description=HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt_arg", nargs="?", metavar="PROMPT", help="the text prompt (or use --prompt, repeatable)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt; repeat for several")
    add_model_options(p)
    p.add_argument("--steps", type=int, default=4,
                   help=f"consistency steps (default 4): at most {MAX_STEPS}, and one per point of the model's skipping "
                        "grid (1000 // k)")
    p.add_argument("--seed", type=int, default=0,
                   help=f"seed of the first image; image i uses seed + i (all within 0-{MAX_SEED})")
    p.add_argument("--batch", type=int, default=1, help=f"images per prompt (default 1, at most {MAX_BATCH} in all)")
    p.add_argument("--w", type=float, default=None, help="guidance scale, LCM form (default: the model's)")
    p.add_argument("--keep-colour", action="store_true",
                   help="keep the RGB samples of a grayscale class (by default a prompt whose training images "
                        "were grayscale, listed in llcm.json 'grayscale', gives its samples' luminance)")
    p.add_argument("--height", type=int, default=None,
                   help=f"pixels, at most {MAX_SIZE}; a multiple of the VAE factor (default: the model's size)")
    p.add_argument("--width", type=int, default=None,
                   help=f"pixels, at most {MAX_SIZE}; a multiple of the VAE factor (default: the model's size)")
    p.add_argument("--out", default="out/generate", help="output folder (default out/generate)")
    p.add_argument("--overwrite", action="store_true", help="replace PNGs of the same names in --out")
    p.add_argument("--device", default="auto", help="auto (a CUDA GPU when torch sees one, else the CPU), cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32",
                   help="weights and activations (fp16/bf16 for Stable-Diffusion-size models on a GPU)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from llcm.images import write_images
    from llcm.pipeline import load_pipeline

    prompts = ([args.prompt_arg] if args.prompt_arg is not None else []) + list(args.prompt)
    if not prompts:
        raise UserError("give a prompt: llcm generate \"axial brain MRI\" (\"\" for unconditional)")
    n = len(prompts) * args.batch  # the numbers are checked before anything is allocated or loaded
    for name, v, lo, hi in (("--batch", args.batch, 1, MAX_BATCH // len(prompts)),
                            ("--seed", args.seed, 0, MAX_SEED - max(n - 1, 0)),
                            ("--height", args.height, 1, MAX_SIZE), ("--width", args.width, 1, MAX_SIZE)):
        if v is not None and not lo <= v <= hi:
            images = (f" ({len(prompts)} prompt{'s' * (len(prompts) > 1)} x --batch: at most {MAX_BATCH} images)"
                      if name == "--batch" else "")
            raise UserError(f"{name} must be between {lo} and {hi}{images}, got {v}")
    all_prompts = [p for p in prompts for _ in range(args.batch)]
    seeds = [args.seed + i for i in range(len(all_prompts))]
    pipe = load_pipeline(args.model, adapter=args.adapter)
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    try:
        pipe.to(device, dtype)
    except (RuntimeError, AssertionError) as exc:
        raise UserError(f"cannot use device {device!r}: {exc}") from None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = pipe(all_prompts, steps=args.steps, seeds=seeds, w=args.w, height=args.height, width=args.width,
                      keep_colour=args.keep_colour)
    for wmsg in caught:
        print(f"warning: {wmsg.message}")
    paths = write_images(result, Path(args.out), pipe.name, args.overwrite)
    print(f"wrote {len(paths)} images and grid.png to {args.out} "
          f"(model {pipe.name} {result.model_hash}, {result.steps} steps at t={result.timesteps}, w={result.w})")
    known = pipe.config.classes
    if known:
        unknown = [p for p in prompts if p and p not in known]
        if unknown:
            print("note: the model was trained on these prompts/classes; others still generate images but "
                  "are outside its training data:\n  " + "\n  ".join(known))
    return 0
