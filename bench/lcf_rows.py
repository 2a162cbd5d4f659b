"""Where on the k-grid a fine-tuned model is (in)consistent: per training row t, on the new latents,
mse(f(z_t), z0) and the consistency gap mse(f(z_t), f(z_{t-k})) with the same noise (the quantity LCF trains).

    python bench/lcf_rows.py MODEL LATENTS [--k 200] [--n 128]
"""

from __future__ import annotations

import argparse

import torch

from llcm.latents import LatentSet
from llcm.models import encode_prompts
from llcm.pipeline import LLCMPipeline


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("latents")
    ap.add_argument("--k", type=int, default=200)
    ap.add_argument("--n", type=int, default=128, help="latents used (default 128)")
    args = ap.parse_args()
    torch.manual_seed(0)
    pipe = LLCMPipeline.from_pretrained(args.model)
    data = LatentSet.load(args.latents)
    z0 = data.latents[: args.n]
    emb = encode_prompts(pipe.components, [data.prompts[0]]).expand(len(z0), -1, -1)
    noise = torch.randn_like(z0)
    rows = [0] + list(range(args.k - 1, pipe.schedule.num_train_timesteps, args.k))
    prev = None
    print(f"{'t':>5} {'mse(f, z0)':>11} {'gap to t-k':>11} {'std of f':>9}")
    with torch.no_grad():
        for t in rows:
            tt = torch.full((len(z0),), t)
            f = pipe.model(pipe.schedule.add_noise(z0, noise, tt), tt, emb, pipe.config.w_default)
            gap = float(((f - prev) ** 2).mean()) if prev is not None else 0.0
            print(f"{t:5d} {float(((f - z0) ** 2).mean()):11.3f} {gap:11.3f} {float(f.std()):9.3f}")
            prev = f
    print(f"latents: variance {float(z0.var()):.3f}")


if __name__ == "__main__":
    main()
