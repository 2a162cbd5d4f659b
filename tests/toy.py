"""A Gaussian toy problem with a closed-form denoiser and exact PF-ODE solution.

Data x ~ N(mu, s^2 I): z_t ~ N(alpha_t mu, alpha_t^2 s^2 + sigma_t^2); E[x | z_t] is linear in z_t, and the
probability-flow ODE maps quantiles to quantiles, so z_s = alpha_s mu + r_s / r_t (z_t - alpha_t mu),
r = sqrt(alpha^2 s^2 + sigma^2).
"""

from __future__ import annotations

import math

import torch

from llcm.schedules import Schedule, expand_like
from llcm.solvers import SOLVERS

MU, SD = 0.7, 0.5
STEPS = [1, 2, 4, 8, 16, 32]


def denoiser(schedule: Schedule, mu: float = MU, sd: float = SD):
    def denoise(z, t):
        a, s = (expand_like(v, z) for v in schedule.alpha_sigma(t))
        x0 = mu + a * sd**2 / (a**2 * sd**2 + s**2) * (z - a * mu)
        return x0, (z - a * x0) / s
    return denoise


def exact(schedule: Schedule, z, t, s, mu: float = MU, sd: float = SD):
    at, st = schedule.alpha_sigma(t)
    as_, ss = schedule.alpha_sigma(s)
    r = torch.sqrt(as_**2 * sd**2 + ss**2) / torch.sqrt(at**2 * sd**2 + st**2)
    return as_ * mu + r * (z - at * mu)


def solve(solver_name: str, steps: int, z0: torch.Tensor, schedule: Schedule, t0=999.0, t1=0.0):
    """`steps` solver steps from t0 to t1, uniform in log-SNR; returns (numerical, exact) endpoints."""
    lam = torch.linspace(float(schedule.lam(t0)), float(schedule.lam(t1)), steps + 1, dtype=torch.float64)
    ts = schedule.t_of_lam(lam)
    ts[0], ts[-1] = t0, t1
    fn, den, z, b = SOLVERS[solver_name], denoiser(schedule), z0.clone(), z0.shape[0]
    for i in range(steps):
        z = fn(den, z, ts[i].expand(b), ts[i + 1].expand(b), schedule)
    return z, exact(schedule, z0, torch.tensor(t0, dtype=torch.float64), torch.tensor(t1, dtype=torch.float64))


def error_table(schedule: Schedule | None = None, steps=STEPS, n: int = 256, seed: int = 0) -> dict:
    """Max abs endpoint error per solver and step count, and the observed order between the last two."""
    schedule = schedule or Schedule.scaled_linear()
    z0 = torch.randn(n, 1, 1, 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    table = {}
    for name in SOLVERS:
        errs = []
        for k in steps:
            z, ref = solve(name, k, z0, schedule)
            errs.append(float((z - ref).abs().max()))
        table[name] = {"errors": errs, "order": math.log2(errs[-2] / errs[-1])}
    return table


if __name__ == "__main__":  # prints the docs table: python tests/toy.py
    tab = error_table()
    print("| solver | " + " | ".join(f"{k} steps" for k in STEPS) + " | observed order |")
    print("|---" * (len(STEPS) + 2) + "|")
    for name, row in tab.items():
        print(f"| {name} | " + " | ".join(f"{e:.2e}" for e in row["errors"]) + f" | {row['order']:.2f} |")
