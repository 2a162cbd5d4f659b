"""Throughput of `llcm synthesize` against diffusers' LatentConsistencyModelPipeline, on the same weights.

llcm: `llcm.synthesize.synthesize` as `llcm synthesize` runs it (its own choice of worker processes and
torch.compile unless told), writing PNG files (encoding and writing counted); its steady rate is the images
finished after its first batch over the time since. diffusers: the pipeline loaded from the same model folder
in one process with the same cores, images returned as numpy arrays (nothing written), timed over --batches
batches before and as many after the llcm run (so a change of machine load weighs on both). Same batch, step
count, prompt and guidance. Prints one line per side (steady images/s, warm-up cost = first batch minus a
steady one, total time for 10,000 images) and `T1 <llcm / diffusers>`.

    python bench/synthesize.py                                   # default model, batch 32, 4 steps, 2 cores
    python bench/synthesize.py --workers 1 --compile off         # llcm as one process, like diffusers
    python bench/synthesize.py --dtype bf16                      # both sides in bf16 (--diffusers-dtype fp32: theirs not)
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
    ap.add_argument("--images", type=int, default=1024, help="images llcm makes (default 1024)")
    ap.add_argument("--batches", type=int, default=8, help="diffusers batches timed before and after llcm (default 8)")
    ap.add_argument("--threads", type=int, default=2, help="cores both sides may use (default 2)")
    ap.add_argument("--workers", type=int, default=None, help="llcm's --workers (default: its own choice)")
    ap.add_argument("--compile", choices=["off", "on"], default="off", help="llcm's --compile (default off)")
    ap.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="llcm's --dtype (default fp32)")
    ap.add_argument("--diffusers-dtype", choices=["fp32", "fp16", "bf16"], default=None,
                    help="diffusers' torch_dtype (default: the same as --dtype)")
    args = ap.parse_args()

    import torch
    from diffusers import LatentConsistencyModelPipeline

    from llcm.pipeline import load_pipeline, resolve_model
    from llcm.synthesize import synthesize

    torch.set_num_threads(args.threads)
    folder = str(resolve_model(args.model))
    config = load_pipeline(args.model).config
    prompt, w = config.classes[0], config.w_default
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    theirs_dtype = args.diffusers_dtype or args.dtype
    theirs = LatentConsistencyModelPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False,
                                                            torch_dtype=dtypes[theirs_dtype])
    theirs.set_progress_bar_config(disable=True)
    size = load_pipeline(args.model).default_size()

    def diffusers_batches(k: int) -> float:
        t0 = time.perf_counter()
        for i in range(k):
            theirs([prompt] * args.batch, num_inference_steps=args.steps, guidance_scale=w + 1.0, height=size,
                   width=size, output_type="np", generator=torch.Generator().manual_seed(i))
        return time.perf_counter() - t0

    first = diffusers_batches(1)
    d_seconds = diffusers_batches(args.batches)
    with tempfile.TemporaryDirectory() as tmp:
        run = synthesize(args.model, Path(tmp) / "out", args.images, classes=[prompt], steps=args.steps, w=w,
                         batch=args.batch, progress=False, compile=args.compile, workers=args.workers,
                         dtype=args.dtype)["this_run"]
    d_seconds += diffusers_batches(args.batches)
    rate = {"diffusers": 2 * args.batches * args.batch / d_seconds, "llcm": run["steady_images_per_s"]}
    warm = {"diffusers": max(0.0, first - args.batch / rate["diffusers"]),
            "llcm": max(0.0, run["first_batch_s"] - args.batch * run["workers"] / rate["llcm"])}
    for k in ("llcm", "diffusers"):
        print(f"{k:9s} images/s {rate[k]:.1f}  warm-up {warm[k]:.1f} s  10000 images {warm[k] + 10000 / rate[k]:.0f} s")
    ratio = rate["llcm"] / rate["diffusers"]
    print(f"T1 {ratio:.2f}  (llcm {args.dtype}, diffusers {theirs_dtype})")
    print(json.dumps({"batch": args.batch, "steps": args.steps, "threads": args.threads, "dtype": args.dtype,
                      "diffusers_dtype": theirs_dtype, "llcm_run": run,
                      "images_per_s": rate, "warm_s": warm, "T1": ratio}))


if __name__ == "__main__":
    main()
