"""The discrete noise schedule of Stable Diffusion, made continuous in time.

q(z_t | z_0) = N(alpha_t z_0, sigma_t^2 I) with alpha_t = sqrt(alphabar_t), sigma_t = sqrt(1 - alphabar_t)
and SD's "scaled linear" betas (0.00085 -> 0.012) over N = 1000 training steps.

Solvers need the schedule between integer steps (a midpoint in log-SNR rarely lands on an integer),
so time is continuous: lambda(t) = log(alpha_t / sigma_t) (DPM-Solver's half log-SNR) is the table
value at integer t and linear in between. At integer t every quantity equals the discrete table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Tensor = torch.Tensor


def expand_like(v: Tensor, z: Tensor) -> Tensor:
    """Reshape a per-sample vector [B] (or a scalar) to broadcast over z [B, C, H, W]."""
    v = torch.as_tensor(v, device=z.device)
    if v.ndim == 0:
        v = v.expand(z.shape[0])
    return v.to(z.dtype).reshape(-1, *([1] * (z.ndim - 1)))


def _closed_form_betas(kind: str, n: int, beta_start: float, beta_end: float) -> Tensor:
    """diffusers' betas (in float64): linear, or SD's scaled_linear = linspace(sqrt(b0), sqrt(b1), N)^2."""
    if kind == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float64) ** 2
    return torch.linspace(beta_start, beta_end, n, dtype=torch.float64)


@dataclass(frozen=True)
class Schedule:
    """alphabar over the training steps; everything else is derived in float64."""

    alphas_cumprod: Tensor  # float64 [N]

    @classmethod
    def scaled_linear(cls, num_train_timesteps: int = 1000, beta_start: float = 0.00085,
                      beta_end: float = 0.012) -> "Schedule":
        return cls.from_betas(_closed_form_betas("scaled_linear", num_train_timesteps, beta_start, beta_end))

    @classmethod
    def from_betas(cls, betas) -> "Schedule":
        """alphabar_t = prod_{i<=t} (1 - beta_i); every beta must be in (0, 1) so that 0 < alphabar < 1."""
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or len(betas) < 2 or not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("betas must be a list of at least 2 values in (0, 1) (llcm does not support "
                             "zero-terminal-SNR schedules: beta = 1 makes alpha 0)")
        return cls(torch.cumprod(1.0 - betas, dim=0))

    @classmethod
    def from_diffusers_config(cls, config: dict) -> "Schedule":
        """Build from a diffusers scheduler config: trained_betas (which, as in diffusers, take precedence),
        or a scaled_linear or linear beta_schedule.

        rescale_betas_zero_snr is refused rather than supported: it makes alpha 0 at t = N-1, where the
        consistency parameterisation and x0 = (z - sigma eps) / alpha divide by alpha (lambda = -inf).
        """
        if config.get("rescale_betas_zero_snr"):
            raise ValueError("rescale_betas_zero_snr is true: llcm does not support zero-terminal-SNR schedules "
                             "(its consistency parameterisation and alpha at t=N-1 assume alpha > 0)")
        n = int(config.get("num_train_timesteps", 1000))
        if config.get("trained_betas") is not None:
            schedule = cls.from_betas(config["trained_betas"])
            if schedule.num_train_timesteps != n:
                raise ValueError(f"trained_betas has {schedule.num_train_timesteps} values but "
                                 f"num_train_timesteps is {n}")
            return schedule
        b0, b1 = float(config.get("beta_start", 0.00085)), float(config.get("beta_end", 0.012))
        kind = config.get("beta_schedule", "scaled_linear")
        if kind not in ("scaled_linear", "linear"):
            raise ValueError(f"unsupported beta_schedule {kind!r} (llcm supports scaled_linear, linear and "
                             "trained_betas)")
        return cls.from_betas(_closed_form_betas(kind, n, b0, b1))

    @property
    def betas(self) -> Tensor:
        a = self.alphas_cumprod
        return 1.0 - a / torch.cat([a.new_ones(1), a[:-1]])

    def to_diffusers_config(self) -> dict:
        """The scheduler fields that describe this schedule, for LCMScheduler/DDIMScheduler configs.

        Only alphabar is stored, so the kind is found by rebuilding scaled_linear and linear from the end
        betas; a schedule that is neither is written as trained_betas.
        """
        betas = self.betas
        n = self.num_train_timesteps
        for kind in ("scaled_linear", "linear"):
            config = {"num_train_timesteps": n, "beta_schedule": kind,
                      "beta_start": float(f"{float(betas[0]):.12g}"), "beta_end": float(f"{float(betas[-1]):.12g}")}
            rebuilt = torch.cumprod(1.0 - _closed_form_betas(kind, n, config["beta_start"], config["beta_end"]), 0)
            if torch.allclose(rebuilt, self.alphas_cumprod.to(torch.float64), rtol=0, atol=1e-9):
                return config
        return {"num_train_timesteps": n, "trained_betas": betas.tolist()}

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    @property
    def _lam_table(self) -> Tensor:
        a = self.alphas_cumprod
        return 0.5 * (torch.log(a) - torch.log1p(-a))

    def lam(self, t: Tensor | float) -> Tensor:
        """lambda(t) = log(alpha_t / sigma_t), piecewise linear between integer steps (float64)."""
        t = torch.as_tensor(t, dtype=torch.float64).clamp(0, self.num_train_timesteps - 1)
        table = self._lam_table.to(t.device)
        i0 = t.floor().long().clamp(max=self.num_train_timesteps - 2)
        frac = t - i0
        return table[i0] + frac * (table[i0 + 1] - table[i0])

    def t_of_lam(self, lam: Tensor) -> Tensor:
        """Inverse of lam(t) (lambda decreases with t), float64."""
        lam = torch.as_tensor(lam, dtype=torch.float64)
        desc = self._lam_table.to(lam.device)
        asc = desc.flip(0)  # increasing lambda as t decreases
        lam_c = lam.clamp(asc[0], asc[-1])
        j = torch.searchsorted(asc, lam_c).clamp(1, len(asc) - 1)  # asc[j-1] <= lam <= asc[j]
        frac = (lam_c - asc[j - 1]) / (asc[j] - asc[j - 1])
        t_hi = (len(asc) - j).to(torch.float64)  # index of asc[j-1] in t
        return t_hi - frac

    def alpha_sigma(self, t: Tensor | float) -> tuple[Tensor, Tensor]:
        """alpha_t and sigma_t (float64) from lambda: alpha^2 = sigmoid(2 lambda), sigma^2 = sigmoid(-2 lambda)."""
        lam = self.lam(t)
        return torch.sigmoid(2 * lam).sqrt(), torch.sigmoid(-2 * lam).sqrt()

    def add_noise(self, z0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """z_t = alpha_t z_0 + sigma_t eps (the forward process q(z_t | z_0))."""
        a, s = self.alpha_sigma(t)
        return expand_like(a, z0) * z0 + expand_like(s, z0) * noise

    def skipping_grid(self, k: int) -> Tensor:
        """The LCM skipping-step grid t = k-1, 2k-1, ..., N-1 (k = 20 gives 50 points ending at 999)."""
        n = self.num_train_timesteps
        if not 1 <= k <= n:
            raise ValueError(f"skipping interval k={k} must be between 1 and the schedule length {n}")
        return torch.arange(1, n // k + 1, dtype=torch.long) * k - 1


def prediction_to_x0_eps(pred: Tensor, z: Tensor, alpha: Tensor, sigma: Tensor,
                         prediction_type: str) -> tuple[Tensor, Tensor]:
    """Convert a network output to (x0_hat, eps_hat); alpha, sigma broadcastable to z.

    epsilon: x0 = (z - sigma eps) / alpha; v_prediction (v = alpha eps - sigma x0): x0 = alpha z - sigma v,
    eps = sigma z + alpha v (uses alpha^2 + sigma^2 = 1); sample: eps = (z - alpha x0) / sigma.
    """
    if prediction_type == "epsilon":
        return (z - sigma * pred) / alpha, pred
    if prediction_type == "v_prediction":
        return alpha * z - sigma * pred, sigma * z + alpha * pred
    if prediction_type == "sample":
        return pred, (z - alpha * pred) / sigma
    raise ValueError(f"unknown prediction_type {prediction_type!r}: use epsilon, v_prediction or sample")


def x0_eps_to_target(x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor, prediction_type: str) -> Tensor:
    """The regression target of a denoising network for a given parameterization."""
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return alpha * eps - sigma * x0
    if prediction_type == "sample":
        return x0
    raise ValueError(f"unknown prediction_type {prediction_type!r}")
