"""The consistency function f_theta(z, w, c, t) around a diffusers UNet (LLCM eq. 11, LCM eq. 9).

f(z, w, c, t) = c_skip(t) z + c_out(t) x0_hat(z, w, c, t), with x0_hat from the UNet's epsilon-
or v-prediction, and the LCM boundary scalings c_skip = sigma_d^2 / ((s t)^2 + sigma_d^2),
c_out = s t / sqrt((s t)^2 + sigma_d^2) (sigma_d = 0.5, s = 10), so c_skip(0) = 1, c_out(0) = 0:
f(z, 0) = z holds by construction, in training and in evaluation alike.

The guidance scale w (LCM form: eps_w = (1 + w) eps_c - w eps_u) reaches the UNet as a sinusoidal
embedding of 1000 w through `timestep_cond` (UNet2DConditionModel's `time_cond_proj_dim`), the same
input diffusers' LatentConsistencyModelPipeline feeds with w = guidance_scale - 1.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from llcm.schedules import Schedule, expand_like, prediction_to_x0_eps

Tensor = torch.Tensor


def boundary_scalings(t: Tensor, sigma_data: float = 0.5, timestep_scaling: float = 10.0) -> tuple[Tensor, Tensor]:
    # LCM: c_skip = sd^2 / ((10 t)^2 + sd^2), c_out = 10 t / sqrt((10 t)^2 + sd^2)
    st = torch.as_tensor(t, dtype=torch.float64) * timestep_scaling
    c_skip = sigma_data**2 / (st**2 + sigma_data**2)
    c_out = st / (st**2 + sigma_data**2).sqrt()
    return c_skip, c_out


def guidance_embedding(w: Tensor, dim: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Sinusoidal features of 1000 w: [sin(1000 w f_i), cos(1000 w f_i)], f_i = 10000^(-i/(dim/2 - 1))."""
    w = torch.as_tensor(w, dtype=torch.float32).reshape(-1) * 1000.0
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=w.device) * -(math.log(10000.0) / (half - 1)))
    args = w[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2 == 1:
        emb = nn.functional.pad(emb, (0, 1))
    return emb.to(dtype)


class ConsistencyModel(nn.Module):
    """f_theta: a UNet with a guidance embedding, wrapped with the boundary condition.

    The backbone never sees c_skip/c_out. `unet` must have `config.time_cond_proj_dim` set
    (see `models.add_guidance_embedding`); for LCM-LoRA-style students without it, w is ignored.
    """

    def __init__(self, unet: nn.Module, schedule: Schedule, prediction_type: str = "epsilon",
                 sigma_data: float = 0.5, timestep_scaling: float = 10.0):
        super().__init__()
        self.unet = unet
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.sigma_data = sigma_data
        self.timestep_scaling = timestep_scaling

    @property
    def guidance_dim(self) -> int | None:
        return getattr(self.unet.config, "time_cond_proj_dim", None)

    def predict_x0(self, z: Tensor, t: Tensor, prompt_embeds: Tensor, w: Tensor | float) -> Tensor:
        """x0_hat(z, w, c, t) from one UNet call."""
        t = torch.as_tensor(t, device=z.device)
        if t.ndim == 0:
            t = t.expand(z.shape[0])
        cond = None
        if self.guidance_dim:
            w = torch.as_tensor(w, dtype=torch.float32, device=z.device)
            cond = guidance_embedding(w.expand(z.shape[0]) if w.ndim == 0 else w, self.guidance_dim, z.dtype)
        out = self.unet(z, t, encoder_hidden_states=prompt_embeds, timestep_cond=cond).sample
        a, s = self.schedule.alpha_sigma(t)
        x0, _ = prediction_to_x0_eps(out, z, expand_like(a, z), expand_like(s, z), self.prediction_type)
        return x0

    def forward(self, z: Tensor, t: Tensor, prompt_embeds: Tensor, w: Tensor | float) -> Tensor:
        # LLCM eq. 11: f = c_skip(t) z + c_out(t) x0_hat
        c_skip, c_out = boundary_scalings(t, self.sigma_data, self.timestep_scaling)
        x0 = self.predict_x0(z, t, prompt_embeds, w)
        return expand_like(c_skip, z) * z + expand_like(c_out, z) * x0
