"""Probability-flow ODE solvers Psi(denoise, z_t, t, s) -> z_s, all with ONE signature.

A *denoiser* maps (z_t, t) to (x0_hat, eps_hat); it hides the network, its parameterization and any
classifier-free guidance. Times are tensors of shape [B] (continuous, see `schedules`). Each solver is
one function registered in SOLVERS; the consistency-distillation target imports them from here.

Notation: lambda = log(alpha/sigma); in the coordinates y = z/alpha, rho = sigma/alpha the PF-ODE
reads dy/drho = eps(z, t), which makes DDIM the exact integral for a constant eps.

| solver      | teacher calls | order | what it is |
|-------------|---------------|-------|------------|
| ddim        | 1             | 1     | DDIM (eta = 0); the step used by LCM |
| leapfrog    | 1             | 1     | LLCM paper eqs. 15-16 as written and as released: equals DDIM |
| midpoint    | 2             | 2     | explicit midpoint ("drift-kick" leapfrog) at the log-SNR midpoint |
| dpmpp       | 2             | 2     | DPM-Solver++(2S), data prediction, midpoint r = 1/2 |
"""

from __future__ import annotations

from typing import Callable

import torch

from llcm.schedules import Schedule, expand_like

Tensor = torch.Tensor
Denoiser = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
Solver = Callable[[Denoiser, Tensor, Tensor, Tensor, Schedule], Tensor]

SOLVERS: dict[str, Solver] = {}
CALLS_PER_STEP: dict[str, int] = {}
ORDER: dict[str, int] = {}


def register(name: str, calls: int, order: int):
    def deco(fn: Solver) -> Solver:
        SOLVERS[name], CALLS_PER_STEP[name], ORDER[name] = fn, calls, order
        return fn
    return deco


def get_solver(name: str) -> Solver:
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; available: {', '.join(SOLVERS)}")
    return SOLVERS[name]


def _as(z: Tensor, *values: Tensor) -> list[Tensor]:
    return [expand_like(v, z) for v in values]


@register("ddim", calls=1, order=1)
def ddim(denoise: Denoiser, z: Tensor, t: Tensor, s: Tensor, schedule: Schedule) -> Tensor:
    # DDIM (Song et al. 2021, eq. 12 with eta = 0): z_s = alpha_s x0_hat + sigma_s eps_hat
    x0, eps = denoise(z, t)
    a_s, s_s = _as(z, *schedule.alpha_sigma(s))
    return a_s * x0 + s_s * eps


@register("leapfrog", calls=1, order=1)
def leapfrog(denoise: Denoiser, z: Tensor, t: Tensor, s: Tensor, schedule: Schedule) -> Tensor:
    """The LLCM paper's Leapfrog step, eqs. 15-16, read literally.

    Interpretation (documented in docs/solvers.md): "alpha_{t-1}" is alphabar at the target time s, the
    position is x = sqrt(alphabar_s) x0_hat, the velocity v = sqrt(1 - alphabar_s) eps_hat, the
    half-step velocity v_1/2 = 2 v, and h = 1/2 (the interval in units of the jump, as in the authors'
    released code). Then x_s = x + h v_1/2 = alpha_s x0_hat + sigma_s eps_hat: exactly the DDIM step.
    No second evaluation and no carried velocity exist in the paper's equations.
    """
    x0, eps = denoise(z, t)
    a_s, s_s = _as(z, *schedule.alpha_sigma(s))
    position = a_s * x0  # x_t = sqrt(alphabar_{t-1}) x0_hat
    velocity = s_s * eps  # v_t = sqrt(1 - alphabar_{t-1}) eps_hat
    v_half = 2.0 * velocity  # v_{1/2} = 2 v_t
    h = 0.5
    return position + h * v_half  # eq. 16: x_{t-1} = x_t + h v_{1/2}


@register("midpoint", calls=2, order=2)
def midpoint(denoise: Denoiser, z: Tensor, t: Tensor, s: Tensor, schedule: Schedule) -> Tensor:
    """Explicit midpoint, the second-order member of the leapfrog family.

    Drift with the start velocity eps_hat(z_t) to the log-SNR midpoint m, "kick" (re-evaluate the
    velocity there), then drift the whole interval with the midpoint velocity:
    y_s = y_t + (rho_s - rho_t) eps_hat(z_m, m), y = z/alpha, rho = sigma/alpha.
    Algebraically the same as DPM-Solver-2 (r = 1/2) in the noise parameterization.
    """
    lam_m = 0.5 * (schedule.lam(t) + schedule.lam(s))
    m = schedule.t_of_lam(lam_m)
    z_m = ddim(denoise, z, t, m, schedule)  # half drift (one teacher call)
    _, eps_m = denoise(z_m, m.to(t.dtype))  # kick: velocity at the midpoint (second call)
    a_t, s_t = schedule.alpha_sigma(t)
    a_s, s_s = schedule.alpha_sigma(s)
    ratio, coef = _as(z, a_s / a_t, s_s - a_s * s_t / a_t)
    return ratio * z + coef * eps_m


@register("dpmpp", calls=2, order=2)
def dpmpp(denoise: Denoiser, z: Tensor, t: Tensor, s: Tensor, schedule: Schedule) -> Tensor:
    # DPM-Solver++(2S) (Lu et al. 2022, Alg. 1 with r = 1/2), data prediction:
    # z_m = (sigma_m/sigma_t) z - alpha_m (e^{-h/2} - 1) x0(z_t);  z_s = (sigma_s/sigma_t) z - alpha_s (e^{-h} - 1) x0(z_m)
    lam_t, lam_s = schedule.lam(t), schedule.lam(s)
    h = lam_s - lam_t
    m = schedule.t_of_lam(lam_t + 0.5 * h)
    a_t, s_t = schedule.alpha_sigma(t)
    a_m, s_m = schedule.alpha_sigma(m)
    a_s, s_s = schedule.alpha_sigma(s)
    x0_t, _ = denoise(z, t)
    r_m, c_m = _as(z, s_m / s_t, -a_m * torch.expm1(-0.5 * h))
    z_m = r_m * z + c_m * x0_t
    x0_m, _ = denoise(z_m, m.to(t.dtype))
    r_s, c_s = _as(z, s_s / s_t, -a_s * torch.expm1(-h))
    return r_s * z + c_s * x0_m


def guided_target(solver: Solver, denoise_pair: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]],
                  z: Tensor, t: Tensor, s: Tensor, w: Tensor, schedule: Schedule) -> Tensor:
    """The augmented PF-ODE target of LCM eq. 17 / LLCM eq. 14:

    z_hat_s = z_t + (1 + w) [Psi(z_t, t, s, c) - z_t] - w [Psi(z_t, t, s, null) - z_t].

    `denoise_pair` is a denoiser over a doubled batch: its first half is conditioned on the prompts,
    its second half on the null prompt, so both solves cost one batched teacher call per stage.
    For a first-order solver this equals one solver step on the CFG-combined predictions.
    """
    z2, t2, s2 = torch.cat([z, z]), torch.cat([t, t]), torch.cat([s, s])
    cond, uncond = solver(denoise_pair, z2, t2, s2, schedule).chunk(2)
    w = expand_like(w, z)
    return z + (1 + w) * (cond - z) - w * (uncond - z)
