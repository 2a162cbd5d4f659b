"""4-step generation at 512 px with a Stable-Diffusion-1.5-shaped UNet and VAE decoder (random weights), against
its FLOP floor, in variants: SDPA attention (diffusers' default), + channels_last, + torch.compile; and the tiny
default model. One line per figure:

    gen512 <variant> images/s <x> ms/image <y> floor_ms <z> of_peak <fraction>

The floor is the UNet's and decoder's FLOPs per image (counted by torch.utils.flop_counter) divided by the
device's peak dense throughput for the dtype (--peak-tflops; default: a table of known GPUs, else unknown).
--cpu-smoke shrinks every shape (a UNet of 32-64 channels at 64 px) so the script runs on a CPU in seconds and
cannot rot; its figures mean nothing.

    python bench/gpu_generate.py                       # on a GPU: bf16, batch 8
    python bench/gpu_generate.py --cpu-smoke
"""

from __future__ import annotations

import argparse
import time

import torch

SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
                 layers_per_block=2, cross_attention_dim=768, attention_head_dim=8, time_cond_proj_dim=256,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4)
SMOKE_UNET = dict(SD15_UNET, sample_size=8, block_out_channels=(32, 64, 64, 64), layers_per_block=1,
                  cross_attention_dim=32, attention_head_dim=4, norm_num_groups=32)
SMOKE_VAE = dict(SD15_VAE, block_out_channels=(32, 32, 32, 32), layers_per_block=1, norm_num_groups=32)
PEAK_TFLOPS = {"H200": 989, "H100": 989, "A100": 312, "L40S": 362, "A10": 125, "RTX 4090": 165}  # dense bf16


def peak_tflops(name: str) -> float | None:
    return next((v for k, v in PEAK_TFLOPS.items() if k.lower() in name.lower()), None)


def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-smoke", action="store_true")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    args = ap.parse_args()

    from diffusers import AutoencoderKL, UNet2DConditionModel

    cuda = torch.cuda.is_available() and not args.cpu_smoke
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    batch = 2 if args.cpu_smoke else args.batch
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**(SMOKE_UNET if args.cpu_smoke else SD15_UNET)).to(device, dtype).eval()
    vae = AutoencoderKL(**(SMOKE_VAE if args.cpu_smoke else SD15_VAE)).to(device, dtype).eval()
    size = unet.config.sample_size
    z0 = torch.randn(batch, 4, size, size, device=device, dtype=dtype)
    text = torch.randn(batch, 77, unet.config.cross_attention_dim, device=device, dtype=dtype)
    cond = torch.zeros(batch, 256, device=device, dtype=dtype)
    ts = [999, 759, 499, 259][: args.steps]

    def generate(u, v, memory_format=torch.contiguous_format):
        z = z0.contiguous(memory_format=memory_format)
        for t in ts:
            eps = u(z, torch.full((batch,), t, device=device), encoder_hidden_states=text, timestep_cond=cond).sample
            z = z - 0.1 * eps
        return v.decode(z / 0.18215).sample

    with torch.inference_mode():
        flops = count_flops(lambda: generate(unet, vae)) / batch
    name = torch.cuda.get_device_name() if cuda else "cpu"
    peak = args.peak_tflops or (peak_tflops(name) if cuda else None)
    floor_ms = flops / (peak * 1e12) * 1e3 if peak else None
    print(f"device {name} dtype {str(dtype).replace('torch.', '')} batch {batch} steps {len(ts)} "
          f"gflops_per_image {flops / 1e9:.1f} peak_tflops {peak or 'unknown'}")

    def timed(label, u, v, memory_format=torch.contiguous_format):
        with torch.inference_mode():
            t_first = time.perf_counter()
            generate(u, v, memory_format)
            if cuda:
                torch.cuda.synchronize()
            warm = time.perf_counter() - t_first
            t0 = time.perf_counter()
            for _ in range(args.repeats):
                generate(u, v, memory_format)
            if cuda:
                torch.cuda.synchronize()
            ms = (time.perf_counter() - t0) / args.repeats / batch * 1e3
        of_peak = f"{floor_ms / ms:.3f}" if floor_ms else "unknown"
        floor = f"{floor_ms:.2f}" if floor_ms else "unknown"
        print(f"gen512 {label} images/s {1e3 / ms:.2f} ms/image {ms:.2f} floor_ms {floor} of_peak {of_peak} "
              f"first_call_s {warm:.1f}")

    timed("sdpa", unet, vae)
    unet.to(memory_format=torch.channels_last)
    vae.to(memory_format=torch.channels_last)
    timed("sdpa+channels_last", unet, vae, torch.channels_last)
    if not args.no_compile:
        timed("sdpa+channels_last+compile", torch.compile(unet), vae, torch.channels_last)

    from llcm.pipeline import load_pipeline

    pipe = load_pipeline("default").to(device, dtype if cuda else None)
    prompt = pipe.config.classes[0]
    n = 8 if args.cpu_smoke else 256
    pipe([prompt] * n, steps=4, seeds=list(range(n)))
    t0 = time.perf_counter()
    pipe([prompt] * n, steps=4, seeds=list(range(n)))
    if cuda:
        torch.cuda.synchronize()
    print(f"default_model images/s {n / (time.perf_counter() - t0):.1f} batch {n} steps 4")


if __name__ == "__main__":
    main()
