"""Few-step consistency sampling (LCM Alg. 1 / multistep consistency sampling) and the teacher's
classical ODE samplers with real classifier-free guidance, for baselines.

Timestep rule for consistency sampling (the one diffusers' LCMScheduler uses since v0.24): take the
skipping-step grid of the distillation (k = 20: 19, 39, ..., 999), reverse it, and pick the indices
floor(linspace(0, len, n, endpoint=False)). 1 step: 999; 2: 999, 499; 4: 999, 759, 499, 259;
8: 999, 879, 759, 639, 499, 379, 259, 139.

Randomness: one torch.Generator per image, seeded with that image's seed, draws first the initial
latent and then each re-noising in order, so any single image can be regenerated alone, and the
draws equal diffusers' pipelines given the same list of generators.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from llcm.consistency import ConsistencyModel
from llcm.presets import MAX_SEED, MAX_SIZE, MAX_STEPS
from llcm.schedules import Schedule, expand_like, prediction_to_x0_eps
from llcm.solvers import get_solver

Tensor = torch.Tensor





def max_steps(num_train_timesteps: int = 1000, k: int = 20) -> int:
    """The most consistency steps on the k-skipping grid: one per grid point, at most MAX_STEPS.

    The one bound of the pipeline, the server's limits and :func:`consistency_timesteps`."""
    return min(MAX_STEPS, num_train_timesteps // k)


def consistency_timesteps(num_steps: int, num_train_timesteps: int = 1000, k: int = 20) -> list[int]:
    """The LCM inference timesteps for `num_steps` steps on the k-skipping grid."""
    hi = max_steps(num_train_timesteps, k)
    if not 1 <= num_steps <= hi:
        raise ValueError(f"steps must be between 1 and {hi} (the k={k} skipping grid), got {num_steps}")
    grid_len = num_train_timesteps // k
    grid = (np.arange(1, grid_len + 1) * k - 1)[::-1]
    idx = np.floor(np.linspace(0, grid_len, num_steps, endpoint=False)).astype(np.int64)
    return [int(t) for t in grid[idx]]


def teacher_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """Evenly spaced ("trailing") teacher timesteps: round(N - 1 - i N / n); 50 steps = 999, 979, ..., 19."""
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"steps must be between 1 and {num_train_timesteps}, got {num_steps}")
    n = num_train_timesteps
    return [int(round(n - 1 - i * n / num_steps)) for i in range(num_steps)]


def make_generators(seeds: Sequence[int], device: str | torch.device = "cpu") -> list[torch.Generator]:
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def draw_noise(generators: Sequence[torch.Generator], shape: Sequence[int], dtype=torch.float32,
               device: str | torch.device = "cpu") -> Tensor:
    """One [1, *shape] draw per generator (CPU generators, moved to device), stacked."""
    draws = [torch.randn((1, *shape), generator=g, dtype=dtype, device=g.device) for g in generators]
    return torch.cat(draws).to(device)


def initial_latents(generators: Sequence[torch.Generator], shape: Sequence[int], schedule: Schedule, t0: int,
                    latent_mean: Sequence[float] | None = None, dtype=torch.float32,
                    device: str | torch.device = "cpu") -> Tensor:
    """The starting latents z_t0 = eps - mean_hw(eps) + sqrt(alpha_bar_t0) * mu, eps ~ N(0, I) (one draw per
    generator); plain eps when ``latent_mean`` is None.

    mu is the per-channel mean of the latents the model was trained on (``latent_mean`` in llcm.json).
    The schedule keeps sqrt(alpha_bar_T) = 0.07 of the signal at t = T = 999, so in training the model sees
    each latent channel's offset in the noisy input's spatial mean and reads colour and brightness from it;
    plain N(0, I) noise lacks it and every sample inherits a wrong channel mean (colour casts, wrong
    brightness). The draw's own per-channel spatial mean mean_hw(eps) is removed too: its std, 1/sqrt(h w),
    is 0.06 on 16x16 latents, as large as the offsets sqrt(alpha_bar_T) mu (0.01-0.10), and the model reads
    colour from it: on the default model 5-12% of seeds at 4 steps gave colourful, shapeless grayscale images,
    the same seeds for every prompt, and none once centred (``python bench/failure_seeds.py``). Still one
    draw per generator, so a seed redraws its image alone, and diffusers' pipelines given ``latents=`` this
    start draw the same images; re-noising draws stay plain. A folder without ``latent_mean`` (older or
    diffusers ones) gets plain noise, as diffusers draws it; one trained on standardised latents
    (``llcm train vae --standardize-latents``) records mu = 0 and gets centred noise.
    """
    z = draw_noise(generators, shape, dtype, device)
    if latent_mean is None:
        return z
    mu = torch.as_tensor(list(latent_mean), dtype=torch.float64)
    if mu.numel() != shape[0]:
        raise ValueError(f"latent_mean has {mu.numel()} channels, the latents {shape[0]}")
    a, _ = schedule.alpha_sigma(torch.tensor(float(t0), dtype=torch.float64))
    offset = (a * mu).to(dtype=dtype, device=z.device).view(-1, *([1] * (len(shape) - 1)))
    return z - z.mean(dim=tuple(range(2, z.dim())), keepdim=True) + offset


@torch.no_grad()
def sample_consistency(model: ConsistencyModel, prompt_embeds: Tensor, w: float | Tensor,
                       generators: Sequence[torch.Generator], latent_shape: Sequence[int],
                       timesteps: Sequence[int], latents: Tensor | None = None,
                       latent_mean: Sequence[float] | None = None) -> Tensor:
    """Multistep consistency sampling: z0 = f(z_tau_i); z_tau_{i+1} = alpha z0 + sigma * fresh noise.

    The last step returns f's output, so one step is exactly one call of f on the initial noise
    (drawn by :func:`initial_latents` unless ``latents`` is given).
    """
    device, dtype = prompt_embeds.device, prompt_embeds.dtype
    z = (initial_latents(generators, latent_shape, model.schedule, timesteps[0], latent_mean, dtype, device)
         if latents is None else latents)
    for i, t in enumerate(timesteps):
        tt = torch.full((z.shape[0],), t, device=device, dtype=torch.long)
        z0 = model(z, tt, prompt_embeds, w)
        if i == len(timesteps) - 1:
            return z0
        a, s = model.schedule.alpha_sigma(torch.tensor(float(timesteps[i + 1])))
        noise = draw_noise(generators, latent_shape, dtype, device)
        z = expand_like(a, z0) * z0 + expand_like(s, z0) * noise
    raise ValueError("timesteps must not be empty")


def cfg_denoiser(unet: Callable, schedule: Schedule, prediction_type: str, prompt_embeds: Tensor,
                 negative_embeds: Tensor, w: float | Tensor) -> Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """A denoiser with real classifier-free guidance: pred_w = (1 + w) pred(c) - w pred(negative).

    w is in LCM form (SD's guidance scale = 1 + w); w = 0 skips the unconditional call.
    Guidance is applied to the raw prediction (epsilon or v), as Stable Diffusion pipelines do.
    """
    def denoise(z: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        tt = t.to(z.dtype) if t.is_floating_point() else t
        if float(torch.as_tensor(w).max()) == 0.0:
            out = unet(z, tt, encoder_hidden_states=prompt_embeds).sample
        else:
            both = unet(torch.cat([z, z]), torch.cat([tt, tt]),
                        encoder_hidden_states=torch.cat([prompt_embeds, negative_embeds])).sample
            cond, uncond = both.chunk(2)
            ww = expand_like(torch.as_tensor(w, dtype=z.dtype), z)
            out = (1 + ww) * cond - ww * uncond
        a, s = schedule.alpha_sigma(t)
        return prediction_to_x0_eps(out, z, expand_like(a, z), expand_like(s, z), prediction_type)
    return denoise


@torch.no_grad()
def sample_ode(denoise: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]], schedule: Schedule,
               solver: str, generators: Sequence[torch.Generator], latent_shape: Sequence[int],
               timesteps: Sequence[int], device: str | torch.device = "cpu", dtype=torch.float32,
               latents: Tensor | None = None, latent_mean: Sequence[float] | None = None) -> Tensor:
    """Solve the PF-ODE over `timesteps` with a registered solver, then return x0_hat at the last one.

    Cost in denoiser calls: (len - 1) * calls_per_step(solver) + 1. Starts from :func:`initial_latents`
    unless ``latents`` is given.
    """
    step = get_solver(solver)
    z = (initial_latents(generators, latent_shape, schedule, timesteps[0], latent_mean, dtype, device)
         if latents is None else latents)
    b = z.shape[0]
    for t, s in zip(timesteps[:-1], timesteps[1:]):
        z = step(denoise, z, torch.full((b,), float(t), device=device), torch.full((b,), float(s), device=device),
                 schedule)
    x0, _ = denoise(z, torch.full((b,), float(timesteps[-1]), device=device))
    return x0


__all__ = ["MAX_SEED", "MAX_SIZE", "MAX_STEPS", "max_steps", "consistency_timesteps", "teacher_timesteps",
           "make_generators", "draw_noise", "initial_latents", "sample_consistency", "cfg_denoiser", "sample_ode"]
