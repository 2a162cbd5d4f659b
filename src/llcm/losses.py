"""Small loss callables: loss(net, batch) -> per-sample loss [B]. No optimiser logic here.

Batches are dicts of tensors prepared by the task (llcm.tasks) with every random draw already made,
so a loss is a pure function of the network and the batch.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from llcm.consistency import ConsistencyModel
from llcm.schedules import Schedule, expand_like, prediction_to_x0_eps, x0_eps_to_target
from llcm.solvers import Solver, guided_target

Tensor = torch.Tensor


def distance(a: Tensor, b: Tensor, kind: str = "huber", huber_c: float = 0.001) -> Tensor:
    """Per-sample distance: 'l2' mean squared error or 'huber' pseudo-Huber mean(sqrt(d^2 + c^2) - c)."""
    d = (a.float() - b.float()).flatten(1)
    if kind == "l2":
        return d.pow(2).mean(1)
    if kind == "huber":
        return (torch.sqrt(d.pow(2) + huber_c**2) - huber_c).mean(1)
    raise ValueError(f"unknown loss {kind!r}: use l2 or huber")


class DenoiserNet(nn.Module):
    """The teacher's trainable network: the UNet's raw prediction (epsilon or v).

    With a ``text_encoder`` and the token ids of the dataset's distinct prompts (``input_ids`` [P, L]),
    the text encoder trains too: the condition is then a row index into those prompts, and all P are
    encoded once per call (P is small) so every row's gradient reaches the encoder.
    """

    def __init__(self, unet: nn.Module, text_encoder: nn.Module | None = None, input_ids: Tensor | None = None):
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder
        if text_encoder is not None:
            self.register_buffer("input_ids", input_ids, persistent=False)

    def forward(self, z: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        if self.text_encoder is not None:  # cond: [B] row indices into input_ids
            cond = self.text_encoder(self.input_ids)[0][cond]
        return self.unet(z, t, encoder_hidden_states=cond).sample


class DenoisingLoss:
    """Teacher (diffusion) loss: || net(alpha_t z0 + sigma_t eps, t, c) - target ||^2, target eps or v.

    batch: z0 [B,C,h,w], noise like z0, t [B] long, embeds [B,L,D] (already dropped to null for CFG), or
    prompt_rows [B] long when the network encodes the prompts itself (text encoder trained).
    """

    def __init__(self, schedule: Schedule, prediction_type: str = "epsilon"):
        self.schedule, self.prediction_type = schedule, prediction_type

    def __call__(self, net: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        z0, noise, t = batch["z0"], batch["noise"], batch["t"]
        a, s = (expand_like(v, z0) for v in self.schedule.alpha_sigma(t))
        target = x0_eps_to_target(z0, noise, a, s, self.prediction_type)
        cond = batch["embeds"] if "embeds" in batch else batch["prompt_rows"]
        pred = net(a * z0 + s * noise, t, cond)
        return distance(pred, target, "l2")


class ConsistencyDistillationLoss:
    """Latent consistency distillation (LCM eq. 8 / LLCM eq. 12):

    d( f_theta(z_{t_{n+k}}, w, c, t_{n+k}),  f_{theta^-}(z_hat_{t_n}, w, c, t_n) ),
    z_hat_{t_n} = eq. 14 with the chosen solver Psi on the frozen teacher (cond and null batched).

    batch: z0, noise, t (= t_{n+k}), s (= t_n), w [B], embeds, null_embeds.
    """

    def __init__(self, teacher_unet: nn.Module, target: ConsistencyModel, solver: Solver, schedule: Schedule,
                 prediction_type: str = "epsilon", metric: str = "huber", huber_c: float = 0.001):
        self.teacher, self.target, self.solver, self.schedule = teacher_unet, target, solver, schedule
        self.prediction_type, self.metric, self.huber_c = prediction_type, metric, huber_c

    def teacher_pair(self, embeds: Tensor, null_embeds: Tensor) -> Callable:
        both = torch.cat([embeds, null_embeds])

        def denoise(z: Tensor, t: Tensor):
            out = self.teacher(z, t, encoder_hidden_states=both).sample
            a, s = (expand_like(v, z) for v in self.schedule.alpha_sigma(t))
            return prediction_to_x0_eps(out, z, a, s, self.prediction_type)
        return denoise

    def __call__(self, net: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        z0, noise, t, s, w = batch["z0"], batch["noise"], batch["t"], batch["s"], batch["w"]
        z_t = self.schedule.add_noise(z0, noise, t)
        pred = net(z_t, t, batch["embeds"], w)  # f_theta at t_{n+k}
        with torch.no_grad():
            z_s = guided_target(self.solver, self.teacher_pair(batch["embeds"], batch["null_embeds"]),
                                z_t, t.float(), s.float(), w, self.schedule)
            target = self.target(z_s, s, batch["embeds"], w)  # f_{theta^-} at t_n
        return distance(pred, target, self.metric, self.huber_c)


class ConsistencyFinetuneLoss:
    """Latent consistency fine-tuning, LLCM Alg. 1 (no teacher, no solver): the SAME noise eps gives
    z_{t_{n+k}} = alpha z + sigma eps and z_{t_n} = alpha' z + sigma' eps; loss d(f_theta(z_{t_{n+k}}), f_{theta^-}(z_{t_n})).

    With `base` (the frozen model before fine-tuning) the rows marked batch["replay"] match the base's own
    output at the same point instead, d(f_theta(z_t), f_base(z_t)): the old classes are held where the base
    had them at every t directly (output distillation, as in Learning without Forgetting), rather than
    re-learnt through the consistency chain from t = 0 up, which is as slow for them as for the new data.
    """

    def __init__(self, target: ConsistencyModel, schedule: Schedule, metric: str = "huber", huber_c: float = 0.001,
                 base: ConsistencyModel | None = None):
        self.target, self.schedule, self.metric, self.huber_c = target, schedule, metric, huber_c
        self.base = base

    def __call__(self, net: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        z0, noise, t, s, w = batch["z0"], batch["noise"], batch["t"], batch["s"], batch["w"]
        z_t = self.schedule.add_noise(z0, noise, t)
        pred = net(z_t, t, batch["embeds"], w)
        with torch.no_grad():
            target = self.target(self.schedule.add_noise(z0, noise, s), s, batch["embeds"], w)
            rows = batch.get("replay")
            if self.base is not None and rows is not None and bool(rows.any()):
                target[rows] = self.base(z_t[rows], t[rows], batch["embeds"][rows], w[rows]).to(target.dtype)
        return distance(pred, target, self.metric, self.huber_c)
