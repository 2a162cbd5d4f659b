"""One latent consistency distillation step at full Stable Diffusion 1.5 size (random weights).

Builds an SD-1.5-shaped UNet (860M parameters, 4x64x64 latents for 512px, 768-d text states) as
teacher, student (+ w embedding) and EMA target, then times draw + eq.-14 target (cond + null) +
student forward/backward + optimizer step, and prints the peak memory. Default optimizer SGD
(AdamW's two moment buffers add 6.9 GB; pass --adamw on a machine with 32+ GB).
Run: python bench/sd15_distill_step.py [--batch 1] [--solver leapfrog] [--device cuda]
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
from diffusers import UNet2DConditionModel

from llcm.consistency import ConsistencyModel
from llcm.losses import ConsistencyDistillationLoss
from llcm.models import add_guidance_embedding
from llcm.schedules import Schedule
from llcm.solvers import get_solver

SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
                 layers_per_block=2, cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--solver", default="leapfrog")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--adamw", action="store_true")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                    help="autocast dtype for the forward passes (GPU)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    torch.manual_seed(0)
    teacher = UNet2DConditionModel(**SD15_UNET).to(dev).requires_grad_(False).eval()
    student = add_guidance_embedding(teacher).to(dev).train()
    target = add_guidance_embedding(teacher).to(dev).requires_grad_(False).eval()
    nparams = sum(p.numel() for p in teacher.parameters())
    sched = Schedule.scaled_linear()
    f = ConsistencyModel(student, sched)
    loss_fn = ConsistencyDistillationLoss(teacher, ConsistencyModel(target, sched), get_solver(args.solver), sched,
                                          metric="huber")
    opt = (torch.optim.AdamW if args.adamw else torch.optim.SGD)(student.parameters(), lr=1e-6)
    b = args.batch
    g = torch.Generator().manual_seed(0)
    t = torch.randint(1, 51, (b,), generator=g) * 20 - 1
    batch = {"z0": torch.randn(b, 4, 64, 64, generator=g), "noise": torch.randn(b, 4, 64, 64, generator=g), "t": t,
             "s": (t - 20).clamp(min=0), "w": torch.rand(b, generator=g) * 10 + 5,
             "embeds": torch.randn(b, 77, 768, generator=g), "null_embeds": torch.randn(b, 77, 768, generator=g)}
    batch = {k: v.to(dev) for k, v in batch.items()}
    amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]

    def step():
        with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
            loss = loss_fn(f, batch).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()

    times = []
    for _ in range(2 if dev.type == "cpu" else 5):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    print(f"SD-1.5-size UNet: {nparams / 1e6:.0f}M parameters, batch {b}, solver {args.solver}, device {dev}, "
          f"{args.dtype}, {'AdamW' if args.adamw else 'SGD'}")
    print(f"step times (s): {', '.join(f'{x:.2f}' for x in times)}  (first includes warm-up)")
    print(f"step_seconds {min(times[1:]):.2f}")
    print(f"peak_memory_GiB {peak:.2f} ({'GPU allocated' if dev.type == 'cuda' else 'process max RSS'})")


if __name__ == "__main__":
    main()
