"""Throughput of `llcm synthesize` against diffusers' LatentConsistencyModelPipeline, on the same weights.

llcm: `llcm.synthesize.synthesize` writing PNG files (encoding and writing counted). diffusers: the pipeline
loaded from the same model folder, images returned as numpy arrays (nothing written). Same batch, step count,
prompt and threads. Each side is warmed up first (its first batch timed apart: the warm-up cost), then the two
are measured in alternating rounds, so a machine whose load changes treats both alike. Prints one line per
figure and `T1 <llcm images/s / diffusers images/s>`, plus the warm-up costs and the total time for 10,000
images (warm-up + 10,000 / steady rate).

    python bench/synthesize.py                                   # default model, batch 32, 4 steps, 2 threads
    python bench/synthesize.py --compile                         # llcm with torch.compile (long runs only)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batches", type=int, default=4, help="batches per side per round (default 4)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", choices=["off", "on", "auto"], default="off",
                    help="llcm's --compile setting for the measured runs (auto decides by run size)")
    args = ap.parse_args()

    import torch
    from diffusers import LatentConsistencyModelPipeline

    from llcm.pipeline import load_pipeline, resolve_model
    from llcm.synthesize import synthesize

    torch.set_num_threads(args.threads)
    folder = str(resolve_model(args.model))
    pipe = load_pipeline(args.model)
    prompt = pipe.config.classes[0]
    w = pipe.config.w_default
    theirs = LatentConsistencyModelPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    theirs.set_progress_bar_config(disable=True)
    size = pipe.default_size()
    n = args.batch * args.batches

    def diffusers_batches(k: int) -> float:
        t0 = time.perf_counter()
        for i in range(k):
            theirs([prompt] * args.batch, num_inference_steps=args.steps, guidance_scale=w + 1.0, height=size,
                   width=size, output_type="np", generator=torch.Generator().manual_seed(i))
        return time.perf_counter() - t0

    def llcm_images(k: int, tmp: Path, tag: str, compile_mode: str) -> float:
        stats = synthesize(pipe, tmp / tag, k, classes=[prompt], steps=args.steps, w=w, batch=args.batch,
                           progress=False, compile=compile_mode)
        return stats["this_run"]["seconds"]

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        warm = {"diffusers": diffusers_batches(1), "llcm": llcm_images(args.batch, tmp, "warm", args.compile)}
        rate = {"diffusers": [0.0, 0], "llcm": [0.0, 0]}
        for r in range(args.rounds):
            rate["llcm"][0] += llcm_images(n, tmp, f"r{r}", args.compile)
            rate["llcm"][1] += n
            rate["diffusers"][0] += diffusers_batches(args.batches)
            rate["diffusers"][1] += n
    per_s = {k: v[1] / v[0] for k, v in rate.items()}
    for k in ("llcm", "diffusers"):
        steady = args.batch / per_s[k]
        extra = max(0.0, warm[k] - steady)
        print(f"{k:9s} images/s {per_s[k]:.1f}  warm-up {extra:.1f} s  10000 images {extra + 10000 / per_s[k]:.0f} s")
    ratio = per_s["llcm"] / per_s["diffusers"]
    print(f"T1 {ratio:.2f}")
    print(json.dumps({"batch": args.batch, "steps": args.steps, "threads": args.threads, "compile": args.compile,
                      "images_per_s": per_s, "warm_s": warm, "T1": ratio}))


if __name__ == "__main__":
    main()
