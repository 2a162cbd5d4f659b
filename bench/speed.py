"""How fast llcm's few-step sampling is, measured side by side in one run.

On the default model (64x64), for each batch size:
  P1 = llcm 4-step call / (4 UNet forwards + 1 VAE decode, timed alone)      target <= 1.10
       (what the pipeline adds around the networks: text encoding, noise, scalings, output)
  P2 = teacher 50-step DDIM with CFG / llcm 4-step call                        target >= 20
  P3 = llcm 4-step call / diffusers' LatentConsistencyModelPipeline 4-step    target <= 1.0
       on the same weights (the model folder is a diffusers folder), same prompts, w and seeds
plus images/s and peak memory. Each time is the median of --repeats runs after a warm-up run, the
four measurements timed in alternation (round by round; the teacher every other round) so that a drift
in the machine's speed hits all of them alike.
The teacher is the model's teacher when --teacher is given; otherwise a UNet of the teacher's
architecture (the student without its w embedding, same weights): its time does not depend on the
weights. The last lines are the headline ratios, at the largest batch (`P1 1.04`).

With a CUDA GPU (--sd15, on by default there) it also times the SD-1.5-size architecture with random
weights at 512x512 (860M-parameter UNet, 4x64x64 latents, CLIP-L-size text encoder, SD VAE) at
batch 1 and 16 in fp16 and bf16, and compares the time per image with the FLOP floor: the FLOPs of
one call (counted by torch.utils.flop_counter) over the bf16 matrix-product rate measured in the
same run.

Run: python bench/speed.py [--model PATH] [--teacher PATH] [--batches 1,16] [--repeats 7] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
import warnings

import torch

from llcm.cli import quiet_libraries
from llcm.models import encode_prompts
from llcm.pipeline import LLCMPipeline, decode_latents, load_pipeline
from llcm.sampling import cfg_denoiser, consistency_timesteps, draw_noise, make_generators, sample_ode
from llcm.sampling import teacher_timesteps
from llcm.consistency import guidance_embedding

PROMPT = "axial brain MRI, T1-weighted"
TARGETS = {"P1": ("<=", 1.10), "P2": (">=", 20.0), "P3": ("<=", 1.0)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, device: torch.device, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def interleaved_medians(fns: dict, device: torch.device, repeats: int, every: dict | None = None) -> dict:
    """Median seconds of each function, timed in alternation (each round runs each function once; a
    function in `every` only every n-th round) so that drifts in the machine's speed hit all alike."""
    every = every or {}
    for fn in fns.values():  # warm-up
        fn()
    times = {name: [] for name in fns}
    for r in range(repeats):
        for name, fn in fns.items():
            if r % every.get(name, 1):
                continue
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(v) for name, v in times.items()}


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: KiB, process peak so far
    return kib / 1024


def teacher_unet(pipe: LLCMPipeline, teacher: str | None):
    """The teacher's UNet: loaded from --teacher, else the student's architecture without cond_proj."""
    from diffusers import UNet2DConditionModel

    if teacher:
        from llcm.models import load_components
        return load_components(teacher).unet.to(pipe.device, pipe.components.unet.dtype).eval()
    student = pipe.components.unet
    config = {k: v for k, v in student.config.items() if not k.startswith("_")}
    config["time_cond_proj_dim"] = None
    unet = UNet2DConditionModel.from_config(config)
    unet.load_state_dict({k: v for k, v in student.state_dict().items() if "cond_proj" not in k})
    return unet.to(pipe.device, student.dtype).eval()


def measure_batch(pipe: LLCMPipeline, t_unet, batch: int, repeats: int, diffusers_folder: str | None) -> dict:
    dev, c = pipe.device, pipe.components
    prompts, seeds = [PROMPT] * batch, list(range(batch))
    w = pipe.config.w_default
    ts = consistency_timesteps(4, pipe.schedule.num_train_timesteps, pipe.config.k)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)

    @torch.no_grad()
    def llcm():
        return pipe(prompts, steps=4, seeds=seeds)

    llcm()
    mem = peak_memory_mib(dev)

    embeds = encode_prompts(c, prompts)
    shape = (c.unet.config.in_channels, *(s // c.vae_scale_factor for s in (pipe.default_size(),) * 2))
    z = draw_noise(make_generators(seeds), shape, embeds.dtype, dev)
    cond = guidance_embedding(torch.full((batch,), w, device=dev), c.unet.config.time_cond_proj_dim).to(embeds.dtype)

    @torch.no_grad()
    def parts():
        for t in ts:
            c.unet(z, torch.full((batch,), t, device=dev), encoder_hidden_states=embeds, timestep_cond=cond)
        c.vae.decode(z / c.scaling_factor)

    @torch.no_grad()
    def teacher():
        both = encode_prompts(c, [PROMPT, ""])
        emb, null = both[:1].expand(batch, -1, -1), both[1:].expand(batch, -1, -1)
        den = cfg_denoiser(t_unet, pipe.schedule, c.prediction_type, emb, null, w)
        z0 = sample_ode(den, pipe.schedule, "ddim", make_generators(seeds), shape, teacher_timesteps(50),
                        device=dev, dtype=emb.dtype)
        return decode_latents(c, z0)

    fns = {"llcm": llcm, "parts": parts, "teacher": teacher}
    dp = None
    if diffusers_folder:
        from diffusers import LatentConsistencyModelPipeline

        dp = LatentConsistencyModelPipeline.from_pretrained(diffusers_folder, safety_checker=None,
                                                           local_files_only=True, torch_dtype=c.unet.dtype).to(dev)
        dp.set_progress_bar_config(disable=True)
        size = pipe.default_size()

        @torch.no_grad()
        def theirs():
            gens = [torch.Generator(dev).manual_seed(s) for s in seeds]
            return dp(prompt=prompts, num_inference_steps=4, guidance_scale=w + 1, generator=gens, output_type="np",
                      height=size, width=size).images

        fns["diffusers"] = theirs
    t = interleaved_medians(fns, dev, repeats, every={"teacher": 2})
    row = {"batch": batch, "llcm_s": t["llcm"], "parts_s": t["parts"], "teacher_ddim50_cfg_s": t["teacher"],
           "images_per_s": batch / t["llcm"], "peak_mib": mem,
           "P1": t["llcm"] / t["parts"], "P2": t["teacher"] / t["llcm"]}
    if "diffusers" in t:
        row.update(diffusers_lcm_s=t["diffusers"], P3=t["llcm"] / t["diffusers"])
    del dp
    return row


def flop_floor_rate(device: torch.device) -> float:
    """bf16 matrix-product FLOP/s measured here (8192^3, mean of 10 after 3 warm-ups)."""
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    sync(device)
    return 10 * 2 * 8192**3 / (time.perf_counter() - t)


def sd15_rows(batches: list[int], repeats: int) -> list[dict]:
    """SD-1.5-size random-weight pipeline at 512x512 on the GPU, fp16 and bf16, against the FLOP floor."""
    from torch.utils.flop_counter import FlopCounterMode

    from llcm.models import build_tiny_components
    from llcm.pipeline import LLCMConfig
    from llcm.schedules import Schedule

    dev = torch.device("cuda")
    preset = {
        "name": "sd15-random",
        "unet": dict(sample_size=64, in_channels=4, out_channels=4, block_out_channels=[320, 640, 1280, 1280],
                     layers_per_block=2, cross_attention_dim=768, attention_head_dim=8, time_cond_proj_dim=256,
                     down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                     up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3),
        "vae": dict(in_channels=3, out_channels=3, latent_channels=4, sample_size=512, layers_per_block=2,
                    block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                    up_block_types=["UpDecoderBlock2D"] * 4, scaling_factor=0.18215),
        "text_encoder": dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                             num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                             bos_token_id=49406, eos_token_id=49407),
    }
    comps = build_tiny_components(preset)
    pipe = LLCMPipeline(comps, LLCMConfig(), Schedule.scaled_linear(), name="sd15-random")
    rate = flop_floor_rate(dev)
    rows = []
    for dtype_name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        pipe.to(dev, dtype)
        for b in batches:
            prompts = [PROMPT] * b
            with torch.no_grad(), FlopCounterMode(display=False) as fc:
                pipe(prompts, steps=4, seeds=0)
            flops = fc.get_total_flops()
            torch.cuda.reset_peak_memory_stats(dev)
            t = median_seconds(lambda: pipe(prompts, steps=4, seeds=0), dev, repeats)
            rows.append({"dtype": dtype_name, "batch": b, "s_per_image": t / b, "floor_s_per_image": flops / rate / b,
                         "tflop_per_image": flops / b / 1e12, "matmul_tflops": rate / 1e12,
                         "peak_mib": torch.cuda.max_memory_allocated(dev) / 2**20})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder (default: the shipped default model)")
    ap.add_argument("--teacher", default=None, help="the model's teacher folder, to time the real teacher")
    ap.add_argument("--batches", default="1,16", help="batch sizes (default 1,16)")
    ap.add_argument("--repeats", type=int, default=7, help="timed runs per measurement (median; default 7)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--sd15", choices=["auto", "yes", "no"], default="auto",
                    help="SD-1.5-size architecture at 512x512 (GPU only; auto = when CUDA is available)")
    ap.add_argument("--no-diffusers", action="store_true", help="skip P3")
    ap.add_argument("--json", default=None, help="write every number to this file")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    dev = torch.device(args.device)
    pipe = load_pipeline(args.model).to(dev)
    folder = args.model
    if folder is None:
        from llcm.pipeline import default_model_path
        folder = str(default_model_path()) if default_model_path() else None
    tmp = None
    if folder is None and not args.no_diffusers:  # an untrained fallback: export it so diffusers can load it
        tmp = tempfile.TemporaryDirectory()
        folder = str(pipe.save(os.path.join(tmp.name, "m")))
    t_unet = teacher_unet(pipe, args.teacher)
    env = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
           "threads": torch.get_num_threads(), "torch": torch.__version__, "model": pipe.name,
           "model_hash": pipe.model_hash, "w": pipe.config.w_default, "repeats": args.repeats,
           "teacher": args.teacher or "student architecture without the w embedding (same weights)"}
    print(json.dumps(env))
    rows = []
    for b in batches:
        row = measure_batch(pipe, t_unet, b, args.repeats, None if args.no_diffusers else folder)
        rows.append(row)
        print(f"batch {b:>3}: llcm 4-step {row['llcm_s'] * 1e3:8.1f} ms ({row['images_per_s']:.1f} img/s) | "
              f"4 UNet + decode {row['parts_s'] * 1e3:8.1f} ms | teacher DDIM-50 CFG {row['teacher_ddim50_cfg_s'] * 1e3:9.1f} ms"
              + (f" | diffusers LCM {row['diffusers_lcm_s'] * 1e3:8.1f} ms" if "P3" in row else "")
              + f" | peak {row['peak_mib']:.0f} MiB" + (" (process RSS)" if dev.type == "cpu" else ""))
        print("           " + "  ".join(f"{k} {row[k]:.3f}" for k in ("P1", "P2", "P3") if k in row))
    sd = []
    if args.sd15 == "yes" or (args.sd15 == "auto" and torch.cuda.is_available()):
        sd = sd15_rows(batches, max(3, args.repeats // 2))
        for r in sd:
            print(f"sd15-size 512px {r['dtype']} batch {r['batch']:>3}: {r['s_per_image'] * 1e3:7.1f} ms/image, "
                  f"FLOP floor {r['floor_s_per_image'] * 1e3:6.1f} ms/image ({r['tflop_per_image']:.2f} TFLOP/image at "
                  f"{r['matmul_tflops']:.0f} TFLOP/s measured bf16 matmul), {r['s_per_image'] / r['floor_s_per_image']:.1f}x "
                  f"floor, peak {r['peak_mib']:.0f} MiB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "rows": rows, "sd15": sd, "argv": sys.argv}, f, indent=2)
    head = rows[-1]
    print(f"headline: batch {head['batch']} (targets: " + ", ".join(f"{k} {o} {v}" for k, (o, v) in TARGETS.items()) + ")")
    for k in ("P1", "P2", "P3"):
        if k in head:
            print(f"{k} {head[k]:.2f}")
    if tmp:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
