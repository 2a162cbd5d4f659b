"""Time of one distillation-target solve (eq. 14, cond + uncond batched) per solver, relative to DDIM.

Teacher calls dominate, so expect about 1.0 for the one-call solvers (ddim, leapfrog) and about 2.0 for
the two-call solvers (midpoint, dpmpp). Run: python bench/solvers.py [--batch 16] [--repeats 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from llcm.models import build_tiny_components, encode_prompts, load_preset
from llcm.schedules import Schedule, expand_like, prediction_to_x0_eps
from llcm.solvers import CALLS_PER_STEP, SOLVERS, guided_target


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    torch.manual_seed(0)
    comps = build_tiny_components(load_preset("tiny-cpu"), seed=0)
    sched = Schedule.scaled_linear()
    b = args.batch
    cond = encode_prompts(comps, ["axial brain MRI"] * b)
    uncond = encode_prompts(comps, [""] * b)
    embeds = torch.cat([cond, uncond])
    size = comps.unet.config.sample_size
    z = torch.randn(b, comps.unet.config.in_channels, size, size)
    t = torch.randint(1, 50, (b,)).float() * 20 - 1
    s = (t - 20).clamp(min=0)
    w = torch.rand(b) * 10 + 5

    def pair(zz, tt):
        out = comps.unet(zz, tt, encoder_hidden_states=embeds).sample
        a, sg = (expand_like(v, zz) for v in sched.alpha_sigma(tt))
        return prediction_to_x0_eps(out, zz, a, sg, comps.prediction_type)

    times = {}
    with torch.no_grad():
        for name in SOLVERS:
            guided_target(SOLVERS[name], pair, z, t, s, w, sched)  # warm-up
        for name in SOLVERS:
            runs = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                guided_target(SOLVERS[name], pair, z, t, s, w, sched)
                runs.append(time.perf_counter() - t0)
            times[name] = statistics.median(runs)
    print(f"tiny UNet, batch {b} (x2 for cond/uncond), median of {args.repeats}, {torch.get_num_threads()} threads")
    print(f"{'solver':10s} {'calls':>5s} {'ms/step':>9s} {'vs ddim':>8s}")
    for name, sec in times.items():
        print(f"{name:10s} {CALLS_PER_STEP[name]:5d} {sec * 1e3:9.2f} {sec / times['ddim']:8.2f}")


if __name__ == "__main__":
    main()
