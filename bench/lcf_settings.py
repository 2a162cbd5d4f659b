"""Which LCF settings learn an unseen modality? Fine-tune one base model with each setting, then score
every result (and the base, zero-shot) on the new data's test split with `llcm evaluate`.

Each --config is NAME="extra llcm finetune options"; all share --steps and --batch, so they see the
same number of images. Prints FID / KID / precision per setting and step count and writes
OUT/settings.json. Runs the fine-tunes one after the other at one thread each (two at a time with
--parallel 2 on a 2-core machine).

    python bench/lcf_settings.py --base default --data data/us --latents lat/us --out runs/lcf-settings \
        --steps 400 --config "lr5e-5=--lr 5e-5" --config "lr2e-4=--lr 2e-4" --config "ema0=--lr 2e-4 --ema 0"
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


def finetune(base: str, latents: str, out: Path, steps: int, batch: int, extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "llcm.cli", "finetune", "--model", base, "--latents", latents, "--out", str(out),
           "--steps", str(steps), "--batch", str(batch), "--checkpoint-every", str(steps), "--quiet",
           *shlex.split(extra)]
    if (out / "checkpoints").exists():
        cmd.append("--resume")
    log = open(out.parent / f"{out.name}.log", "a")
    print("$", shlex.join(cmd), flush=True)
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="the LLCM to adapt (a folder, or 'default')")
    ap.add_argument("--data", required=True, help="the new dataset (train/ + test/)")
    ap.add_argument("--latents", required=True, help="its train latents, encoded with the base's VAE")
    ap.add_argument("--out", required=True)
    ap.add_argument("--config", action="append", required=True, metavar='NAME="OPTIONS"')
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--parallel", type=int, default=1, help="fine-tunes at a time (one thread each)")
    ap.add_argument("--per-class", type=int, default=80, help="images generated per setting and step count")
    ap.add_argument("--eval-steps", default="1,2,4")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    configs = dict(c.split("=", 1) for c in args.config)
    pending, running, seconds = list(configs.items()), [], {}
    while pending or running:
        while pending and len(running) < args.parallel:
            name, extra = pending.pop(0)
            if (out / name / "model").exists():
                continue
            (out / name).mkdir(exist_ok=True)
            running.append((name, time.perf_counter(), finetune(args.base, args.latents, out / name, args.steps,
                                                                args.batch, extra)))
        for item in list(running):
            name, t0, proc = item
            if proc.poll() is not None:
                running.remove(item)
                seconds[name] = round(time.perf_counter() - t0, 1)
                if proc.returncode:
                    sys.exit(f"{name} failed: see {out / (name + '.log')}")
        time.sleep(2)
    models = ["--model", f"zero-shot={args.base}"]
    for name in configs:
        models += ["--model", f"{name}={out / name / 'model'}"]
    cmd = [sys.executable, "-m", "llcm.cli", "evaluate", "--data", args.data, "--out", str(out / "eval"), *models,
           "--per-class", str(args.per_class), "--steps", args.eval_steps, "--no-memorization", "--no-classifier",
           "--quiet"]
    print("$", shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    results = json.loads((out / "eval" / "results.json").read_text())
    rows = []
    print("| setting | options | steps | FID | KID | precision | recall |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for run in results["runs"]:
        m = run["metrics"]
        name = run["model"]
        rows.append({"setting": name, "options": configs.get(name, "(base, no fine-tuning)"), "steps": run["steps"],
                     "fid": m["fid"], "kid": m["kid_mean"], "precision": m["precision"], "recall": m["recall"],
                     "finetune_seconds": seconds.get(name)})
        r = rows[-1]
        print(f"| {name} | {r['options']} | {r['steps']} | {r['fid']:.1f} | {r['kid']:.3f} | {r['precision']:.2f} | "
              f"{r['recall']:.2f} |")
    (out / "settings.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
