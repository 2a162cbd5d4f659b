"""DreamBooth-style baseline (Ruiz et al. 2023): a per-class fine-tune of the teacher with prior preservation.

For one class of the training data, the teacher's UNet is fine-tuned on that class's latents with an
*instance prompt* ("sks <class prompt>" by default, a rare token in front of the class prompt; or the
class prompt itself), while a *prior-preservation* term keeps it able to draw the class as the frozen
original teacher did:

    loss = || eps_theta(z_t, t, c_inst) - eps ||^2  +  lambda * || eps_theta(z'_t', t', c_prior) - eps' ||^2

with z'_0 ~ the original teacher sampled (DDIM, CFG) from the class prompt before any update
(DreamBooth eq. 2; lambda = 1). The result is a teacher-format folder, sampled with DDIM/DPM-Solver++
like the teacher. `train_dreambooth_set` trains one model per class and writes `dreambooth.json`, the
index `llcm evaluate` reads to pick each class's model and prompt.

This is a small, faithful baseline, not the full DreamBooth recipe: no text-encoder training, and the
class images are latents sampled once at the start (with one seed per prior latent).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from llcm.errors import UserError
from llcm.fileio import follow_link, link_to, record_name
from llcm.latents import LatentSet, channel_mean
from llcm.losses import DenoiserNet, DenoisingLoss
from llcm.models import Components, encode_prompts
from llcm.schedules import Schedule
from llcm.training import TaskBase

Tensor = torch.Tensor
SET_FORMAT = "llcm-dreambooth-set-v1"
INDEX_FILE = "dreambooth.json"


@torch.no_grad()
def sample_teacher_latents(components: Components, schedule: Schedule, prompts: Sequence[str],
                           seeds: Sequence[int], solver: str = "ddim", steps: int = 25, w: float = 6.5,
                           negative: str = "", batch: int = 32, unet: nn.Module | None = None,
                           shape: Sequence[int] | None = None, latent_mean: Sequence[float] | None = None) -> Tensor:
    """x0 latents of a teacher sampled with real CFG (w in LCM form) along `steps` evenly spaced timesteps,
    from :func:`llcm.sampling.initial_latents` (``latent_mean``: the teacher's llcm.json value)."""
    from llcm.sampling import cfg_denoiser, make_generators, sample_ode, teacher_timesteps

    c = components
    unet = unet or c.unet
    device = next(unet.parameters()).device
    ts = teacher_timesteps(steps, schedule.num_train_timesteps)
    size = c.unet.config.sample_size
    shape = tuple(shape) if shape is not None else (c.unet.config.in_channels, size, size)
    out = []
    for i in range(0, len(prompts), batch):
        p = list(prompts[i:i + batch])
        emb = encode_prompts(c, p).to(device)
        neg = encode_prompts(c, [negative] * len(p)).to(device)
        den = cfg_denoiser(unet, schedule, c.prediction_type, emb, neg, w)
        out.append(sample_ode(den, schedule, solver, make_generators(seeds[i:i + batch]), shape, ts,
                              device=device, dtype=emb.dtype, latent_mean=latent_mean).cpu())
    return torch.cat(out) if out else torch.zeros((0, *shape))


def class_rows(data: LatentSet, which: str) -> tuple[Tensor, str, str]:
    """(latent row indices, class name, class prompt) of the class named or prompted `which`."""
    classes = list(data.meta.get("classes") or data.prompts)
    for p, (prompt, name) in enumerate(zip(data.prompts, classes)):
        if which in (prompt, name):
            rows = torch.nonzero(data.prompt_index == p).flatten()
            if len(rows):
                return rows, name, prompt
    raise UserError(f"class {which!r} is not in the latent cache; it has: {', '.join(map(str, classes))}")


class DreamBoothTask(TaskBase):
    """A Task for llcm.training.train: one class, instance loss + lambda * prior-preservation loss."""

    name = "dreambooth"

    def __init__(self, components: Components, data: LatentSet, class_name: str,
                 instance_prompt: str | None = None, rare_token: str = "sks", prior_prompt: str | None = None,
                 num_prior: int = 100, prior_weight: float = 1.0, prior_steps: int = 25, prior_w: float = 6.5,
                 prior_solver: str = "ddim", cond_dropout: float = 0.1, schedule: Schedule | None = None,
                 seed: int = 0):
        if components.text_encoder is None:
            raise UserError("DreamBooth needs a text-conditioned teacher")
        if num_prior < 1:
            raise UserError(f"num_prior must be >= 1, got {num_prior}")
        if prior_weight < 0:
            raise UserError(f"prior_weight must be >= 0, got {prior_weight}")
        if not 0 <= cond_dropout < 1:
            raise UserError(f"cond_dropout must be in [0, 1), got {cond_dropout}")
        data.check_compatible(components.unet)
        self.components, self.schedule = components, schedule or Schedule.scaled_linear()
        rows, self.class_name, self.class_prompt = class_rows(data, class_name)
        self.latents = data.latents[rows]
        # the whole set's channel mean: what the base teacher was trained on, where its samples start
        self.latent_mean = channel_mean(data.latents)
        self.instance_prompt = instance_prompt or f"{rare_token} {self.class_prompt}"
        self.prior_prompt = prior_prompt or self.class_prompt
        self.prior_weight, self.cond_dropout = float(prior_weight), float(cond_dropout)
        self.source = record_name(data.meta.get("source", ""))  # the data by name (older caches: a path)
        self.data_hash = data.meta.get("data_hash")
        components.vae.requires_grad_(False)
        components.text_encoder.requires_grad_(False)
        unet = components.unet
        # class-prior latents from the frozen ORIGINAL teacher, before any update (one seed per latent);
        # sampled on the GPU when there is one, identically in every process
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        unet.to(device).eval()
        components.text_encoder.to(device)
        self.prior_seeds = [seed * 100_003 + i for i in range(num_prior)]
        self.prior_latents = sample_teacher_latents(components, self.schedule, [self.prior_prompt] * num_prior,
                                                    self.prior_seeds, prior_solver, prior_steps, prior_w,
                                                    shape=tuple(self.latents.shape[1:]),
                                                    latent_mean=self.latent_mean)
        self.prior_settings = {"num_prior": num_prior, "steps": prior_steps, "w": prior_w, "solver": prior_solver,
                               "seed": seed}
        emb = encode_prompts(components, [self.instance_prompt, self.prior_prompt, ""]).float().cpu()
        components.text_encoder.to("cpu")
        self.instance_embed, self.prior_embed, self.null = emb[0:1], emb[1:2], emb[2:3]
        unet.train()
        self.trainable = DenoiserNet(unet)
        self.loss_fn = DenoisingLoss(self.schedule, components.prediction_type)

    def num_examples(self) -> int:
        return len(self.latents)

    def _embeds(self, embed: Tensor, b: int, gen: torch.Generator) -> Tensor:
        e = embed.expand(b, -1, -1).clone()
        e[torch.rand(b, generator=gen) < self.cond_dropout] = self.null  # keeps the unconditional branch for CFG
        return e

    def draw(self, idx: Tensor, gen: torch.Generator) -> dict[str, Tensor]:
        """Every random draw of the global batch: instance noise/t/dropout, a prior latent and its noise/t/dropout."""
        b, n, z0 = len(idx), self.schedule.num_train_timesteps, self.latents[idx]
        batch = {"z0": z0, "noise": torch.randn(z0.shape, generator=gen),
                 "t": torch.randint(0, n, (b,), generator=gen), "embeds": self._embeds(self.instance_embed, b, gen)}
        pz = self.prior_latents[torch.randint(0, len(self.prior_latents), (b,), generator=gen)]
        batch.update({"prior_z0": pz, "prior_noise": torch.randn(pz.shape, generator=gen),
                      "prior_t": torch.randint(0, n, (b,), generator=gen),
                      "prior_embeds": self._embeds(self.prior_embed, b, gen)})
        return batch

    def loss(self, net, batch: dict[str, Tensor]) -> Tensor:
        # DreamBooth eq. 2: instance denoising loss + lambda * prior-preservation denoising loss
        inst = self.loss_fn(net, batch)
        prior = self.loss_fn(net, {"z0": batch["prior_z0"], "noise": batch["prior_noise"], "t": batch["prior_t"],
                                   "embeds": batch["prior_embeds"]})
        return inst + self.prior_weight * prior

    def after_step(self) -> None:
        pass

    def state_modules(self) -> dict[str, nn.Module]:
        return {}

    def final_components(self) -> Components:
        return dataclasses.replace(self.components, unet=self.trainable.unet)

    def record(self) -> dict:
        return {"task": "dreambooth", "class": self.class_name, "class_prompt": self.class_prompt,
                "instance_prompt": self.instance_prompt, "prior_prompt": self.prior_prompt,
                "prior_weight": self.prior_weight, "instances": len(self.latents), "prior": self.prior_settings,
                "data": self.source, "data_hash": self.data_hash}

    def save_model(self, folder: Path) -> Path:
        from llcm.model_folder import ModelConfig
        from llcm.pipeline import save_model_folder

        cfg = ModelConfig(classes=[self.instance_prompt], source=self.record(), latent_mean=self.latent_mean)
        return save_model_folder(self.final_components(), self.schedule, cfg, folder, overwrite=True,
                                 pipeline_class="StableDiffusionPipeline")

    @torch.no_grad()
    def sample_grid(self):
        import numpy as np
        from PIL import Image

        from llcm.images import make_grid
        from llcm.pipeline import decode_latents

        unet = self.trainable.unet
        was = unet.training
        unet.eval()
        z = sample_teacher_latents(self.components, self.schedule, [self.instance_prompt] * 4, range(4), "ddim", 20,
                                   4.0, unet=unet, shape=tuple(self.latents.shape[1:]),
                                   latent_mean=self.latent_mean)
        unet.train(was)
        imgs = decode_latents(self.components, z.to(next(self.components.vae.parameters()).device))
        return make_grid([Image.fromarray((i * 255).round().astype(np.uint8)) for i in imgs])


# ------------------------------------------------------------------------------------------ a set of classes

def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:80] or "class"


def read_set(folder: str | os.PathLike) -> dict:
    """The dreambooth.json index of a folder: {"classes": {class: {"model": abs path, "prompt", ...}}}; each
    model is recorded relative to the folder (older sets: an absolute path, taken as it is)."""
    folder = Path(folder)
    f = folder / INDEX_FILE
    if not f.is_file():
        raise UserError(f"{folder} has no {INDEX_FILE}; train it with `llcm train dreambooth`")
    index = json.loads(f.read_text())
    for entry in index.get("classes", {}).values():
        entry["model"] = str(follow_link(entry["model"], folder))
    return index


def write_set_entry(folder: str | os.PathLike, task: DreamBoothTask, model: Path, teacher: str,
                    teacher_hash: str | None = None) -> Path:
    """Add (or replace) one class in OUT/dreambooth.json. `teacher` names the teacher (provenance only: a name,
    not a path, with its UNet hash); each class's model is recorded relative to OUT."""
    folder = Path(folder)
    f = folder / INDEX_FILE
    index = json.loads(f.read_text()) if f.is_file() else {"format": SET_FORMAT, "teacher": record_name(teacher),
                                                            "teacher_hash": teacher_hash, "classes": {}}
    index["classes"][task.class_name] = {"model": link_to(model, folder), "prompt": task.instance_prompt,
                                         **{k: v for k, v in task.record().items() if k != "task"}}
    tmp = f.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(index, indent=2))
    os.replace(tmp, f)
    return f


__all__ = ["DreamBoothTask", "sample_teacher_latents", "class_rows", "read_set", "write_set_entry", "slug"]
