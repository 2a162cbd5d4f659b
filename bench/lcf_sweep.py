"""Many LCF settings, trained anywhere, scored where the Inception weights are.

`run` fine-tunes one base model once per --config (NAME="llcm finetune options"; NAME=zero-shot for the
base itself; NAME="route:TEACHER_OPTS||DISTILL_OPTS" for the costly route: `llcm train teacher` from the base's
weights on the new latents, then `llcm distill --student BASE` against that teacher), several processes at a time, and samples --per-class images of the new prompt per step count
(seeds 0..N-1, as `llcm evaluate` seeds class 0). Each setting's images, its loss and its training time go
to OUT/NAME.npz. The fine-tuned models are not kept (--keep keeps them). On a GPU every setting is seconds.

`score` computes FID / KID / precision (Inception, the same code as `llcm evaluate`) of every OUT/*.npz
against the new dataset's test split, prints a table and writes OUT/scores.json (with --grayscale the
generated images are first reduced to their luminance, as `llcm generate` does for a grayscale class:
OUT/scores-gray.json).

    python bench/lcf_sweep.py run --base default --latents lat/us --out runs/sweep --parallel 4 \\
        --config zero-shot=zero-shot --config now="" --config k-curr="--k-start 1000"
    python bench/lcf_sweep.py score --data data/us --out runs/sweep
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def one(args) -> None:
    """One setting: fine-tune (unless zero-shot), then sample; writes OUT/NAME.npz."""
    import torch

    from llcm.cli import main as llcm
    from llcm.latents import LatentSet
    from llcm.pipeline import LLCMPipeline, resolve_model

    out = Path(args.out)
    run = out / "runs" / args.name
    info = {"name": args.name, "options": args.options}
    t0 = time.perf_counter()
    if args.options == "zero-shot":
        folder = resolve_model(args.base)
    elif args.options.startswith("route:"):  # the costly route: a teacher fine-tuned from the base, re-distilled
        t_opts, d_opts = args.options[len("route:"):].split("||")
        base = str(resolve_model(args.base))
        for cmd in (["train", "teacher", "--base", base, "--out", str(run / "teacher"), *shlex.split(t_opts)],
                    ["distill", "--teacher", str(run / "teacher" / "model"), "--student", base,
                     "--out", str(run / "distill"), *shlex.split(d_opts)]):
            if llcm([*cmd, "--latents", args.latents, "--quiet", "--checkpoint-every", "1000000"]):
                raise SystemExit(1)
        folder = run / "distill" / "model"
    else:
        rc = llcm(["finetune", "--model", args.base, "--latents", args.latents, "--out", str(run), "--quiet",
                   "--checkpoint-every", "1000000", *shlex.split(args.options)])
        if rc:
            raise SystemExit(rc)
        folder = run / "model"
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        info["loss_last"] = float(np.mean([r["loss"] for r in rows[-5:]])) if rows else None
        info["steps"] = json.loads((run / "summary.json").read_text())["step"]  # a --time-limit may end it early
    info["train_s"] = time.perf_counter() - t0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pipe = LLCMPipeline.from_pretrained(str(folder))
    pipe.to(device)
    prompt = list(dict.fromkeys(LatentSet.load(args.latents).prompts))[0]
    arrays = {}
    for steps in args.eval_steps:
        imgs = []
        for i in range(0, args.per_class, 40):
            seeds = list(range(i, min(i + 40, args.per_class)))
            imgs.append(pipe([prompt] * len(seeds), steps, seeds, keep_colour=args.keep_colour).images)
        arrays[f"s{steps}"] = (np.clip(np.concatenate(imgs), 0, 1) * 255).round().astype(np.uint8)
    info["prompt"], info["device"] = prompt, str(device)
    np.savez_compressed(out / f"{args.name}.npz", info=json.dumps(info), **arrays)
    if not args.keep and run.exists():
        import shutil

        shutil.rmtree(run)
    print(json.dumps(info), flush=True)


def run(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pending = [c.split("=", 1) for c in args.config]
    running = []
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    while pending or running:
        while pending and len(running) < args.parallel:
            name, options = pending.pop(0)
            if (out / f"{name}.npz").exists():
                continue
            cmd = [sys.executable, __file__, "one", "--name", name, "--options", options, "--base", args.base,
                   "--latents", args.latents, "--out", str(out), "--per-class", str(args.per_class),
                   "--eval-steps", ",".join(map(str, args.eval_steps))] + (["--keep"] if args.keep else []) \
                + (["--keep-colour"] if args.keep_colour else [])
            log = open(out / f"{name}.log", "w")
            running.append((name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)))
        time.sleep(0.5)
        for item in list(running):
            if item[1].poll() is not None:
                running.remove(item)
                print(f"{item[0]}: exit {item[1].returncode}", flush=True)


def to_gray(images: np.ndarray) -> np.ndarray:
    from llcm.images import luminance_rgb

    return luminance_rgb(images)


def score(args) -> None:
    from llcm.evaluation.evaluate import metrics_or_none
    from llcm.evaluation.features import extract_features, get_extractor

    out = Path(args.out)
    ex = get_extractor("inception")
    real = extract_features(ex, str(Path(args.data) / args.split), progress=False)
    table = out / ("scores-gray.json" if args.grayscale else "scores.json")
    done = json.loads(table.read_text()) if table.exists() else {}
    for f in sorted(out.glob("*.npz")):
        z = np.load(f)
        info = json.loads(str(z["info"]))
        for key in sorted(k for k in z.files if k.startswith("s")):
            tag = f"{f.stem}/{key}"
            if tag in done:
                continue
            images = to_gray(z[key]) if args.grayscale else z[key]
            m = metrics_or_none(real, extract_features(ex, images, progress=False), "inception")
            done[tag] = {"options": info["options"], "steps": int(key[1:]), "train_s": round(info["train_s"], 1),
                         "loss": info.get("loss_last"), **{k: m[k] for k in ("fid", "kid_mean", "precision", "recall")}}
            table.write_text(json.dumps(done, indent=1))
    if args.floor and "real-train/s0" not in done:  # real images the model trained on, as many as generated ones
        train = extract_features(ex, str(Path(args.data) / "train"), progress=False)
        pick = np.random.default_rng(0).choice(len(train), min(args.floor, len(train)), replace=False)
        m = metrics_or_none(real, train[pick], "inception")
        done["real-train/s0"] = {"options": f"{len(pick)} train images", "steps": 0, "train_s": 0.0, "loss": None,
                                 **{k: m[k] for k in ("fid", "kid_mean", "precision", "recall")}}
        table.write_text(json.dumps(done, indent=1))
    print(f"{'setting':28s} {'steps':>5s} {'FID':>7s} {'KID':>6s} {'prec':>5s}  options")
    for tag, r in sorted(done.items(), key=lambda kv: (kv[1]["steps"], kv[1]["fid"])):
        print(f"{tag.split('/')[0]:28s} {r['steps']:5d} {r['fid']:7.1f} {r['kid_mean']:6.3f} {r['precision']:5.2f}  "
              f"{r['options']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    steps = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    for name in ("run", "one"):
        p = sub.add_parser(name)
        p.add_argument("--base", default="default")
        p.add_argument("--latents", required=True)
        p.add_argument("--out", required=True)
        p.add_argument("--per-class", type=int, default=80)
        p.add_argument("--eval-steps", type=steps, default=[1, 4])
        p.add_argument("--keep", action="store_true", help="keep each setting's run folder (OUT/runs/NAME)")
        p.add_argument("--keep-colour", action="store_true",
                       help="sample the RGB images even for a grayscale class (llcm generate --keep-colour)")
        if name == "run":
            p.add_argument("--config", action="append", required=True, metavar='NAME="OPTIONS"')
            p.add_argument("--parallel", type=int, default=1)
            p.add_argument("--threads", type=int, default=1, help="OMP threads per process")
        else:
            p.add_argument("--name", required=True)
            p.add_argument("--options", required=True)
    p = sub.add_parser("score")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--grayscale", action="store_true", help="score the generated images' luminance")
    p.add_argument("--floor", type=int, default=0, metavar="N",
                   help="also score N random train images against the test split: the FID a perfect copy of the "
                        "training data would get at this sample size (row real-train, steps 0)")
    args = ap.parse_args()
    {"run": run, "one": one, "score": score}[args.cmd](args)


if __name__ == "__main__":
    main()
