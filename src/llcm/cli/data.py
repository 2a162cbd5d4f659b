"""`llcm data build` and `llcm data mini`: thin wrappers over `build_dataset` and `build_mini`."""

from __future__ import annotations

import argparse
import sys

from llcm.errors import UserError

BUILD_EPILOG = """\
examples:
  llcm data build ~/downloads/chest_xray ~/downloads/brain-tumor.zip --out data/medimgs
  llcm data build kvasir=~/dl/kvasir-v2 --licence kvasir="CC BY 4.0" --cap 2000 --size 512 --out data/gi
  llcm data build src/ --out data/x --mapping my_taxonomy.json --holdout-count 35

A source is a folder (class folders at any depth; train/ test/ val/ levels are splits, not
classes; CSV/TSV files with a path and a label column label the files they list) or a
zip/tar archive (extracted safely into the output's cache). Sources are never modified.
An interrupted build resumes when run again with the same arguments.
"""


def _licences(values: list[str]) -> dict:
    out = {}
    for v in values or []:
        name, sep, text = v.partition("=")
        if sep and name and " " not in name:
            out[name] = text
        else:
            out["*"] = v
    return out


def _cmd_build(args: argparse.Namespace) -> int:
    from llcm.data.build import build_dataset

    stats = build_dataset(
        args.sources, args.out, size=args.size, crop=not args.no_crop, image_format=args.format,
        quality=args.quality, color="keep" if args.keep_channels else "rgb", cap=args.cap,
        test_fraction=args.test_fraction, seed=args.seed,
        holdout=tuple(args.holdout or ()), holdout_count=args.holdout_count, min_size=args.min_size,
        blank_std=args.blank_std, near_duplicate_distance=args.near_dup_distance, mapping=args.mapping,
        prompt_template=args.prompt_template, require_mapped=args.require_mapped, nifti_axis=args.nifti_axis,
        nifti_step=args.nifti_step, licences=_licences(args.licence), path_column=args.path_column,
        label_column=args.label_column, title=args.title, workers=args.workers, force=args.force,
        keep_cache=args.keep_cache, progress=not args.quiet,
    )
    _summary(stats, args.out)
    return 0


def _summary(stats: dict, out, elapsed: float | None = None) -> None:
    t, run = stats["totals"], stats.get("run", {})
    if elapsed is None:
        elapsed = run.get("elapsed_s", 0.0)
    state = "up to date" if run.get("up_to_date") else f"{elapsed:.1f} s"
    print(f"{out}: {t['classes']} classes, {t['train']} train, {t['test']} test, {t['rejected']} left out ({state})")
    for reason, n in stats["rejections"].items():
        print(f"  {reason}: {n}")
    if stats["unmapped"]:
        print(f"  {len(stats['unmapped'])} class(es) not in the taxonomy: see card.md (use --mapping)")


def _cmd_mini(args: argparse.Namespace) -> int:
    import time

    from llcm.data.mini import build_mini

    t0 = time.perf_counter()
    try:
        path = build_mini(args.out, size=args.size, seed=args.seed, per_class=args.per_class,
                          workers=args.workers, progress=not args.quiet, force=args.force)
    except ImportError as exc:
        raise UserError(f"the mini dataset needs the [mini] extra (scikit-image, nilearn): {exc}") from None
    import json

    stats = json.loads((path / "stats.json").read_text())
    _summary(stats, path, time.perf_counter() - t0)
    return 0


def _cmd_openworld(args: argparse.Namespace) -> int:
    from llcm.data.openworld import HELD_OUT, MODALITIES, check_modalities, write_dataset

    names = check_modalities(args.modality or [m for m in MODALITIES if m not in HELD_OUT])
    names = [n for n in names if n not in check_modalities(args.leave_out or [])]
    try:
        path = write_dataset(args.out, names, args.train_per_modality, args.test_per_modality, size=args.size,
                             seed=args.seed, augment=not args.no_augment, progress=not args.quiet)
    except ImportError as exc:
        raise UserError(f"the open-world corpus needs the [mini] extra (scikit-image, nilearn): {exc}") from None
    print(f"{path}: {len(names)} modalities ({', '.join(names)}), {args.train_per_modality} train and "
          f"{args.test_per_modality} test crops each")
    return 0


OPENWORLD_EPILOG = """\
modalities (pixels shipped inside scikit-image, nilearn, pydicom and nibabel, plus procedural content):
  ultrasound, microscopy, nuclear-medicine   held out of the default model's VAE: the unseen data
  mri, ct, fundus, histology, natural, procedural   the default VAE's open-world training corpus

examples:
  llcm data openworld --out data/open-world                          the VAE corpus (held-out three left out)
  llcm data openworld --out data/us --modality ultrasound --train-per-modality 256 --test-per-modality 80 \\
      --no-augment                                                   an unseen-modality dataset for LCF
  llcm data openworld --out data/ow-no-ct --leave-out ct             a leave-one-modality-out corpus
"""


def register(sub) -> None:
    data = sub.add_parser("data", help="build a medical image dataset (data build) or the offline one (data mini)",
                          description="Turn downloaded medical image folders into a clean, documented dataset.")
    dsub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    data.set_defaults(func=lambda a: (data.print_help(), 0)[1])

    b = dsub.add_parser("build", help="build a dataset from folders and archives",
                        description="Clean, de-duplicate, label and split medical image sources into "
                        "train/ and test/ image folders with metadata.jsonl, card.md and stats.json.",
                        epilog=BUILD_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("sources", nargs="+", metavar="SRC", help="folder or zip/tar archive; NAME=PATH names the source")
    b.add_argument("--out", required=True, help="output folder (empty, or a previous build to resume/update)")
    g = b.add_argument_group("images")
    g.add_argument("--size", type=int, default=512, help="shorter side after resizing (default 512)")
    g.add_argument("--no-crop", action="store_true", help="keep the aspect ratio instead of a centre square crop")
    g.add_argument("--format", choices=("jpg", "png"), default="jpg", help="output format (default jpg)")
    g.add_argument("--quality", type=int, default=95, help="JPEG quality (default 95)")
    g.add_argument("--keep-channels", action="store_true", help="keep grayscale images 1-channel (default: RGB)")
    g.add_argument("--nifti-axis", choices=("axial", "coronal", "sagittal"), default="axial",
                   help="slicing axis for NIfTI volumes (default axial)")
    g.add_argument("--nifti-step", type=int, default=1, help="keep every N-th NIfTI slice (default 1)")
    c = b.add_argument_group("cleaning")
    c.add_argument("--min-size", type=int, default=64, help="reject images whose shorter side is smaller (default 64)")
    c.add_argument("--blank-std", type=float, default=2.0, help="reject images with pixel std below this (default 2)")
    c.add_argument("--near-dup-distance", type=int, default=12,
                   help="perceptual-hash Hamming distance (of 512 bits) for near duplicates; -1 disables (default 12)")
    s = b.add_argument_group("classes and splits")
    s.add_argument("--cap", type=int, default=2000, help="train images per class; the excess goes to test; 0 = no cap")
    s.add_argument("--test-fraction", type=float, default=0.1, metavar="F",
                   help="also put this share of each class in test (at least 1 image of a class of 2 or more), "
                   "so small classes can be evaluated; 0 = only the cap's excess, the paper's rule (default 0.1)")
    s.add_argument("--seed", type=int, default=0, help="seed of the per-class split (default 0)")
    s.add_argument("--holdout", action="append", metavar="CLASS",
                   help="a class (id or glob) put entirely in test; repeatable")
    s.add_argument("--holdout-count", type=int, default=0, help="also hold out N classes drawn with the seed")
    s.add_argument("--mapping", help="taxonomy mapping JSON extending the default (see docs/data.md)")
    s.add_argument("--prompt-template", help="e.g. '[{body_part} ]{modality}[, {disease}]'; [..] drops if empty")
    s.add_argument("--require-mapped", action="store_true", help="leave out classes not in the taxonomy")
    s.add_argument("--path-column", help="path column of CSV/TSV label files (default: auto)")
    s.add_argument("--label-column", help="label column of CSV/TSV label files (default: auto)")
    s.add_argument("--licence", action="append", metavar="[NAME=]TEXT",
                   help="licence of a source (NAME=TEXT) or of all sources (TEXT); repeatable")
    r = b.add_argument_group("run")
    r.add_argument("--title", default="llcm medical image dataset", help="title of card.md")
    r.add_argument("--workers", type=int, default=0, help="decoding processes (default: CPU count, at most 8)")
    r.add_argument("--force", action="store_true", help="rebuild from scratch even if up to date")
    r.add_argument("--keep-cache", action="store_true", help="keep the .llcm-build cache after success")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=_cmd_build)

    m = dsub.add_parser("mini", help="build the embedded offline dataset (no download)",
                        description="Generate the embedded dataset (pixels shipped in scikit-image, nilearn and "
                        "pydicom, plus procedural phantoms) and build it with `llcm data build`.")
    m.add_argument("--out", required=True, help="output folder")
    m.add_argument("--size", type=int, default=64, choices=(64, 128), help="image size (default 64)")
    m.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    m.add_argument("--per-class", type=int, default=None, help="images generated per class (default 410)")
    m.add_argument("--workers", type=int, default=0, help="processes (default: CPU count, at most 8)")
    m.add_argument("--force", action="store_true", help="rebuild even if up to date")
    m.add_argument("--quiet", action="store_true", help="no progress bar")
    m.set_defaults(func=_cmd_mini)

    o = dsub.add_parser("openworld", help="crops of every medical modality that ships offline, by modality",
                        description="Write an imagefolder dataset (class = modality) of random crops of real "
                        "pixels shipped inside installed packages plus generic content, to train a VAE that "
                        "must reconstruct modalities it never saw, or to make small unseen-modality datasets for "
                        "adaptation. Train crops are augmented (scale, gamma, contrast, desaturation, flips); "
                        "test crops come from pixels no train crop uses.",
                        epilog=OPENWORLD_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    o.add_argument("--out", required=True, help="output folder (must not exist)")
    o.add_argument("--modality", action="append", metavar="NAME",
                   help="a modality to include (repeatable; default: all but the three held out)")
    o.add_argument("--leave-out", action="append", metavar="NAME", help="a modality to leave out (repeatable)")
    o.add_argument("--train-per-modality", type=int, default=1500, help="train crops per modality (default 1500)")
    o.add_argument("--test-per-modality", type=int, default=100, help="test crops per modality (default 100)")
    o.add_argument("--size", type=int, default=64, help="crop size in pixels (default 64)")
    o.add_argument("--seed", type=int, default=0, help="seed of the crops (default 0)")
    o.add_argument("--no-augment", action="store_true",
                   help="plain crops for train too (a dataset to adapt a model to, rather than a VAE corpus)")
    o.add_argument("--quiet", action="store_true", help="no progress bar")
    o.set_defaults(func=_cmd_openworld)


if __name__ == "__main__":  # pragma: no cover
    from llcm.cli import main

    sys.exit(main(["data", *sys.argv[1:]]))
