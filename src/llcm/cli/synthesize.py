"""`llcm synthesize`: a model -> a synthetic dataset (PNG, DICOM or NIfTI) in the layout `llcm data build` writes."""

from __future__ import annotations

import argparse

from llcm.cli.options import add_model_options

HELP = """\
Write a synthetic dataset: --per-class images of every class the model knows (or of --classes), in the layout
`llcm data build` writes (train/<class>/..., train/metadata.jsonl with the prompt, class, taxonomy, seed, steps,
w, model hash and synthetic: true; card.md with the model's card; stats.json), so `llcm encode`, `llcm evaluate`
and Hugging Face `datasets`' imagefolder read it (PNG). Grayscale modalities (MRI, CT, X-ray, ultrasound ...)
are single-channel files, fundus and histopathology RGB.

Formats: png (default); dicom (Secondary Capture, DERIVED\\SECONDARY, conversion type SYN, patient
SYNTHETIC, no dates or identities, UIDs derived from the model hash and seed, the prompt, seed and steps in
ImageComments); nifti (one 2D slice per .nii.gz with a unit affine, or with --stack one volume per class).

Deterministic: image i of class c uses seed --seed + c * 1000000 + i (c = the class's position in the model's
list, as `llcm evaluate` seeds), in batches that start at fixed indices, so a rerun writes the same bytes and
one image equals `llcm generate --seed` for that seed. Resumable: an interrupted run continues where it
stopped when run again with the same settings; a folder holding anything else is refused.

examples:
  llcm synthesize --model default --per-class 20 --out synth/mini
  llcm synthesize --model default --per-class 500 --classes chest-xray-nodule --format dicom --out synth/nodules
  llcm synthesize --model runs/us/model --per-class 1000 --format nifti --stack --out synth/us
  llcm synthesize --model default --per-class 100 --filter-memorized --data data/mini --out synth/checked
  llcm evaluate --data data/mini --utility synth/mini --out runs/utility     train on synthetic, test on real
"""


def register(sub) -> None:
    p = sub.add_parser("synthesize", help="model -> synthetic dataset (PNG, DICOM, NIfTI)", description=HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(p)
    p.add_argument("--per-class", type=int, required=True, help="images per class")
    p.add_argument("--classes", nargs="+", default=None, metavar="CLASS",
                   help="class names, folder names or prompts (default: every class the model lists)")
    p.add_argument("--steps", type=int, default=4, help="consistency steps (default 4)")
    p.add_argument("--w", type=float, default=None, help="guidance scale, LCM form (default: the model's)")
    p.add_argument("--seed", type=int, default=0, help="first seed of class 0 (default 0)")
    p.add_argument("--format", choices=["png", "dicom", "nifti"], default="png", help="file format (default png)")
    p.add_argument("--stack", action="store_true", help="nifti: one volume per class instead of one file per image")
    p.add_argument("--batch", type=int, default=32,
                   help="images per sampling batch (default 32); part of the settings: resume with the same")
    p.add_argument("--filter-memorized", action="store_true",
                   help="check each image against --data's train split (llcm evaluate's memorization check) and "
                        "redraw a flagged one with the next seed of its class; the card counts them")
    p.add_argument("--data", default=None,
                   help="the dataset the model was trained on: its class names and taxonomy (stats.json) and, with "
                        "--filter-memorized, its train images")
    p.add_argument("--out", required=True, help="output folder: new or empty, or an interrupted run to resume")
    p.add_argument("--compile", choices=["on", "off"], default="off",
                   help="torch.compile the UNet and decoder (default off: on the default model and 2 CPU cores it gave no "
                        "gain once warm; for larger models or GPUs; images may then differ by one grey level on a few "
                        "pixels, and it is part of the settings a resume must repeat)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32",
                   help="the networks' precision (default fp32: the images of `llcm generate`). fp16/bf16 as `llcm "
                        "generate --dtype` gives them: for GPUs, and bf16 on CPUs with AVX-512 BF16 or AMX (default "
                        "model, 2 cores: about 1.1x faster, images within about 1 grey level on average but up to "
                        "80 on a few pixels); part of the settings a resume must repeat")
    p.add_argument("--workers", type=int, default=None,
                   help="processes that sample and write (default: on a CPU one single-threaded process per core for "
                        "runs of 1,000 images or more, else 1; 1 on a GPU or with --filter-memorized); the images do not "
                        "depend on it")
    p.add_argument("--device", default="auto", help="auto (a CUDA GPU when torch sees one, else the CPU), cpu, cuda ...")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from llcm.synthesize import synthesize

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    stats = synthesize(args.model or "default", args.out, args.per_class, classes=args.classes, steps=args.steps,
                       w=args.w, seed=args.seed, fmt=args.format, stack=args.stack, batch=args.batch,
                       filter_memorized=args.filter_memorized, data=args.data, adapter=args.adapter, device=device,
                       progress=not args.quiet, compile=args.compile, workers=args.workers, dtype=args.dtype)
    run = stats["this_run"]
    rate = f" ({run['images_per_s']:.1f} images/s, {run['workers']} process{'es' * (run['workers'] > 1)})" \
        if run["images_per_s"] else ""
    redrawn = sum(c["memorized_redrawn"] for c in stats["classes"].values())
    print(f"{args.out}: {stats['totals']['train']} images of {len(stats['classes'])} classes "
          f"({run['images']} made now in {run['seconds']:.1f} s{rate}"
          f"{f'; {redrawn} redrawn as near-copies of training images' if args.filter_memorized else ''})")
    return 0
