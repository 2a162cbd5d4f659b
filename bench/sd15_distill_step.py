"""One latent consistency distillation step at full Stable Diffusion 1.5 size (random weights), and the --dry-run
planner at that size.

Step mode (default): builds an SD-1.5-shaped UNet (860M parameters, 4x64x64 latents for 512px, 768-d text states)
as teacher, student (+ w embedding) and EMA target, then times draw + eq.-14 target (cond + null) + student
forward/backward + optimizer step, and prints the peak memory (process max RSS on a CPU, max allocated on a GPU).
Default optimizer SGD (AdamW's two moment buffers add 6.9 GB; pass --adamw on a machine with 32+ GB). As in the
training loop, --gradient-checkpointing turns it on in the student, and on a GPU with --dtype bf16|fp16 the frozen
teacher is held in that dtype (llcm.training.frozen_dtype); the EMA target stays fp32.

--compare runs the step twice, without and with --gradient-checkpointing, each in its own process (so each peak is
its own), and prints both.

--ema-precision shows why an EMA target (decay > 0) is kept in fp32 while the teacher is cast.

--plan builds the real DistillTask at SD-1.5 size (random-weight UNet, VAE and CLIP text encoder) and prints the
planner's table (llcm.training.plan_run's parts) for a GPU process at --batch images (--mixed-precision), without
and with gradient checkpointing (fp32 too). The activations are measured here, as the planner does on this device:
on a CPU one full-size step at micro-batch 1 plus 16x16 latent crops at micro-batch 1 and 2 for the part that does
not grow with the batch (llcm.training.measure_activations); bf16 under the CPU's autocast. About 17 GB of memory,
20 minutes on 2 cores.

Run: python bench/sd15_distill_step.py [--batch 1] [--solver leapfrog] [--device cuda] [--gradient-checkpointing]
     python bench/sd15_distill_step.py --compare
     python bench/sd15_distill_step.py --plan --batch 128 --mixed-precision bf16
     python bench/sd15_distill_step.py --ema-precision
     python bench/sd15_distill_step.py --smoke --compare     (any mode; shrunk shapes: seconds on a CPU)
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import subprocess
import sys
import time

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from llcm.consistency import ConsistencyModel
from llcm.losses import ConsistencyDistillationLoss
from llcm.models import add_guidance_embedding
from llcm.schedules import Schedule
from llcm.solvers import get_solver
from llcm.training import frozen_dtype

SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
                 layers_per_block=2, cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD15_VAE = dict(in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512, norm_num_groups=32, scaling_factor=0.18215)
SD15_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406,
                 eos_token_id=49407)
# --smoke: every shape shrunk (a UNet of 32-64 channels on 8x8 latents, a 2-layer text encoder) so the modes run
# on a CPU in seconds and cannot rot (bench/gpu_check.sh --cpu-smoke); the figures mean nothing.
SMOKE_UNET = dict(SD15_UNET, sample_size=8, block_out_channels=(32, 64, 64, 64), layers_per_block=1,
                  cross_attention_dim=32, attention_head_dim=4)
SMOKE_VAE = dict(SD15_VAE, block_out_channels=(32, 32, 32, 32), layers_per_block=1, sample_size=64)
SMOKE_TEXT = dict(SD15_TEXT, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
HALF = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
GIB = 2**30


def step_mode(args) -> None:
    dev = torch.device(args.device)
    torch.manual_seed(0)
    amp = HALF[args.dtype]
    teacher = UNet2DConditionModel(**SD15_UNET).to(dev).requires_grad_(False).eval()
    student = add_guidance_embedding(teacher).to(dev).train()
    target = add_guidance_embedding(teacher).to(dev).requires_grad_(False).eval()
    teacher.to(dtype=frozen_dtype(dev.type, {"fp32": "no"}.get(args.dtype, args.dtype)))  # as llcm.training does
    if args.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    nparams = sum(p.numel() for p in teacher.parameters())
    sched = Schedule.scaled_linear()
    f = ConsistencyModel(student, sched)
    loss_fn = ConsistencyDistillationLoss(teacher, ConsistencyModel(target, sched), get_solver(args.solver), sched,
                                          metric="huber")
    opt = (torch.optim.AdamW if args.adamw else torch.optim.SGD)(student.parameters(), lr=1e-6)
    b, side, ctx = args.batch, SD15_UNET["sample_size"], SD15_UNET["cross_attention_dim"]
    g = torch.Generator().manual_seed(0)
    t = torch.randint(1, 51, (b,), generator=g) * 20 - 1
    batch = {"z0": torch.randn(b, 4, side, side, generator=g), "noise": torch.randn(b, 4, side, side, generator=g),
             "t": t, "s": (t - 20).clamp(min=0), "w": torch.rand(b, generator=g) * 10 + 5,
             "embeds": torch.randn(b, 77, ctx, generator=g), "null_embeds": torch.randn(b, 77, ctx, generator=g)}
    batch = {k: v.to(dev) for k, v in batch.items()}

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
    peak = (torch.cuda.max_memory_allocated() / GIB if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    print(f"{'smoke-size' if args.smoke else 'SD-1.5-size'} UNet: {nparams / 1e6:.0f}M parameters, batch {b}, solver {args.solver}, device {dev}, "
          f"{args.dtype}, {'AdamW' if args.adamw else 'SGD'}, gradient checkpointing "
          f"{'on' if args.gradient_checkpointing else 'off'}")
    print(f"step times (s): {', '.join(f'{x:.2f}' for x in times)}  (first includes warm-up)")
    print(f"step_seconds {min(times[1:]):.2f}")
    print(f"peak_memory_GiB {peak:.2f} ({'GPU allocated' if dev.type == 'cuda' else 'process max RSS'})")


def compare_mode(argv: list[str]) -> None:
    """The step without and with checkpointing, each in a fresh process (a peak RSS never goes down)."""
    rest = [a for a in argv if a not in ("--compare", "--gradient-checkpointing")]
    rows = []
    for extra in ([], ["--gradient-checkpointing"]):
        out = subprocess.run([sys.executable, __file__, *rest, *extra], capture_output=True, text=True, check=True)
        print(out.stdout, end="", flush=True)
        peak = re.search(r"peak_memory_GiB ([\d.]+)", out.stdout).group(1)
        secs = re.search(r"step_seconds ([\d.]+)", out.stdout).group(1)
        rows.append((bool(extra), float(peak), float(secs)))
    print("gradient checkpointing | peak memory (GiB) | step (s)")
    for on, peak, secs in rows:
        print(f"{'on' if on else 'off':>22} | {peak:>17.2f} | {secs:.2f}")


def sd15_task(solver: str):
    """The library's DistillTask at SD-1.5 size: random weights, 4 random 64x64 latents with 2 prompts."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from llcm.latents import LatentSet
    from llcm.models import Components, build_clip_tokenizer
    from llcm.tasks import DistillTask

    torch.manual_seed(0)
    comps = Components(unet=UNet2DConditionModel(**SD15_UNET).eval(), vae=AutoencoderKL(**SD15_VAE).eval(),
                       text_encoder=CLIPTextModel(CLIPTextConfig(**SD15_TEXT)).eval(),
                       tokenizer=build_clip_tokenizer(), prediction_type="epsilon", scaling_factor=0.18215)
    side = SD15_UNET["sample_size"]
    data = LatentSet(torch.randn(4, 4, side, side), torch.arange(4) % 2, ["axial brain MRI", "chest X-ray"], {})
    return DistillTask(comps, data, solver=solver, k=20, w_min=5.0, w_max=15.0, ema_decay=0.95)


def plan_mode(args) -> None:
    from llcm.training import (TrainConfig, enable_gradient_checkpointing, format_plan, measure_activations,
                               memory_plan, network_rows)

    dev = torch.device(args.device)
    t0 = time.perf_counter()
    task = sd15_task(args.solver)
    task.trainable.to(dev)
    task.to(dev)
    print(f"built the SD-1.5-size DistillTask in {time.perf_counter() - t0:.0f} s", flush=True)
    precisions = ["no"] + ([args.mixed_precision] if args.mixed_precision != "no" else [])
    for ckpt in (False, True):
        if ckpt:
            enable_gradient_checkpointing(task.trainable)
        for mp in precisions:
            cfg = TrainConfig(out="unused", batch_size=args.batch, mixed_precision=mp, gradient_checkpointing=ckpt)
            amp = HALF.get(mp)

            def autocast(amp=amp):
                return torch.autocast(dev.type, dtype=amp, enabled=amp is not None)
            t0 = time.perf_counter()
            act = measure_activations(task, cfg, dev, autocast)
            act["method"] += f", on {dev.type}"
            took = time.perf_counter() - t0
            print(json.dumps({"mixed_precision": mp, "gradient_checkpointing": ckpt, "seconds": round(took, 1),
                              "activations": act}), flush=True)
            plan = memory_plan(network_rows(task, "cuda", mp), act, cfg, 1, "cuda")
            print(format_plan(plan).replace("plan, per process: device cuda",
                                            "plan for one GPU process (activations measured on this device)"))
            print(json.dumps({"plan": plan}), flush=True)


def ema_precision_mode(steps: int = 2000, n: int = 200_000, lr: float = 8e-6, decay: float = 0.95) -> None:
    """Why an EMA target (decay > 0) stays fp32: a student drifting by Adam-sized steps (lr, sign of a biased random
    direction) for `steps` steps, its EMA kept in fp32, bf16 and fp16. Weights ~ N(0, 0.05^2), as in a UNet."""
    g = torch.Generator().manual_seed(0)
    w0, bias = torch.randn(n, generator=g) * 0.05, torch.randn(n, generator=g).sign()
    print(f"EMA decay {decay}, lr {lr}, {steps} steps, {n} weights")
    print("target dtype | mean |EMA - fp32 EMA| | in units of the fp32 EMA's lag behind the student")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        student, ema32, ema = w0.clone(), w0.clone(), w0.clone().to(dtype)
        noise = torch.Generator().manual_seed(1)
        for _ in range(steps):
            student -= lr * (0.5 * bias + torch.randn(n, generator=noise)).sign()
            ema32.lerp_(student, 1 - decay)
            ema.lerp_(student.to(dtype), 1 - decay)  # what llcm's after_step does in the target's dtype
        lag = (student - ema32).abs().mean().item()
        err = (ema.float() - ema32).abs().mean().item()
        print(f"{str(dtype).replace('torch.', ''):>12} | {err:.2e} | {err / lag:.1f}x (lag {lag:.2e})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=1, help="step: batch; --plan: images per GPU process")
    ap.add_argument("--solver", default="leapfrog")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--adamw", action="store_true")
    ap.add_argument("--dtype", default="fp32", choices=list(HALF), help="autocast dtype for the forward passes (GPU)")
    ap.add_argument("--gradient-checkpointing", action="store_true", help="in the student (step mode)")
    ap.add_argument("--compare", action="store_true", help="the step without and with checkpointing, two processes")
    ap.add_argument("--plan", action="store_true", help="the --dry-run planner at SD-1.5 size")
    ap.add_argument("--mixed-precision", default="bf16", choices=["no", "fp16", "bf16"], help="--plan's precision")
    ap.add_argument("--ema-precision", action="store_true", help="why an EMA target stays fp32 (a few seconds)")
    ap.add_argument("--smoke", action="store_true", help="shrink every shape (CPU seconds; figures meaningless)")
    args = ap.parse_args()
    if args.smoke:  # the modes read the module's shapes
        global SD15_UNET, SD15_VAE, SD15_TEXT
        SD15_UNET, SD15_VAE, SD15_TEXT = SMOKE_UNET, SMOKE_VAE, SMOKE_TEXT
    if args.ema_precision:
        ema_precision_mode()
    elif args.compare:
        compare_mode(sys.argv[1:])
    elif args.plan:
        plan_mode(args)
    else:
        step_mode(args)


if __name__ == "__main__":
    main()
