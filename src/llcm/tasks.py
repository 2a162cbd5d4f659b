"""Training tasks for the one loop in llcm.training: what is trained, on what, with which loss.

TeacherTask   - retrain/fine-tune a text-conditioned latent diffusion UNet (full or LoRA), CFG dropout.
DistillTask   - latent consistency distillation from a frozen teacher with a chosen solver (LLCM / LCM).
FinetuneTask  - latent consistency fine-tuning (LCF, LLCM Alg. 1) of a trained LLCM, no teacher.

Each task precomputes the text embeddings of its (few) distinct prompts once, and in `draw` makes
every random choice of a step for the global batch (see llcm.training), reading latents only for the
rows this process trains on (`local_rows`).
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import torch
from torch import nn

from llcm.adapter import add_lora, merged_unet
from llcm.consistency import ConsistencyModel
from llcm.errors import UserError
from llcm.fileio import record_name
from llcm.latents import LatentSet, channel_mean, read_rows
from llcm.losses import ConsistencyDistillationLoss, ConsistencyFinetuneLoss, DenoiserNet, DenoisingLoss
from llcm.models import Components, add_guidance_embedding, encode_prompts, tokenize_prompts
from llcm.schedules import Schedule
from llcm.solvers import get_solver
from llcm.training import TaskBase

Tensor = torch.Tensor


def data_source(task: str, data: LatentSet) -> dict:
    """A model's provenance in llcm.json: the task, and the latents' data by name (a cache written before
    llcm recorded names gives an absolute path: its last part) with the data_hash that identifies it."""
    meta = data.meta
    return {"task": task, "data": record_name(meta.get("source", "")),
            **({"data_hash": meta["data_hash"]} if "data_hash" in meta else {})}


@torch.no_grad()
def prompt_table(components: Components, prompts: list[str], batch: int = 64) -> Tensor:
    """Embeddings of each distinct prompt, [P, L, D], computed once with the frozen text encoder."""
    out = [encode_prompts(components, prompts[i:i + batch]) for i in range(0, len(prompts), batch)]
    return torch.cat(out).float()


class _PromptData(TaskBase):
    """Shared data plumbing: latents + prompt table + null embedding."""

    def __init__(self, components: Components, data: LatentSet):
        if len(data) == 0:
            raise UserError("the latent cache is empty")
        data.check_compatible(components.unet)
        self.components, self.data = components, data
        table = prompt_table(components, list(data.prompts) + [""])
        self.embeds, self.null = table[:-1], table[-1:]

    def num_examples(self) -> int:
        return len(self.data)


class TeacherTask(_PromptData):
    name = "teacher"

    def __init__(self, components: Components, data: LatentSet, schedule: Schedule | None = None,
                 cond_dropout: float = 0.1, lora_rank: int = 0, sample_prompts: list[str] | None = None,
                 train_text_encoder: bool = False):
        super().__init__(components, data)
        if components.text_encoder is None:
            raise UserError("the teacher needs a text encoder (text-conditioned UNet)")
        if not 0 <= cond_dropout < 1:
            raise UserError(f"cond_dropout must be in [0, 1), got {cond_dropout}")
        if train_text_encoder and lora_rank:
            raise UserError("train the text encoder with a full fine-tune, not with LoRA (--lora-rank 0)")
        if train_text_encoder and getattr(components.text_encoder.config, "use_attention_mask", False):
            raise UserError("training a text encoder that needs an attention mask is not supported")
        self.schedule = schedule or Schedule.scaled_linear()
        self.cond_dropout = cond_dropout
        self.train_text_encoder = train_text_encoder
        unet = components.unet
        unet.train()
        components.vae.requires_grad_(False)
        components.text_encoder.requires_grad_(train_text_encoder)
        if lora_rank:
            add_lora(unet, lora_rank)
        if train_text_encoder:  # the null prompt "" is the last row: CFG's unconditional branch trains too
            ids = tokenize_prompts(components, list(data.prompts) + [""]).input_ids
            components.text_encoder.train()
            self.trainable = DenoiserNet(unet, components.text_encoder, ids)
        else:
            self.trainable = DenoiserNet(unet)
        self.loss_fn = DenoisingLoss(self.schedule, components.prediction_type)
        self.sample_prompts = sample_prompts or list(dict.fromkeys(data.prompts))[:8]

    def draw(self, idx: Tensor, gen: torch.Generator) -> dict[str, Tensor]:
        b = len(idx)
        z0 = read_rows(self.data.latents, idx, self.local_rows)
        drop = torch.rand(b, generator=gen) < self.cond_dropout
        batch = {"z0": z0, "noise": torch.randn(z0.shape, generator=gen),
                 "t": torch.randint(0, self.schedule.num_train_timesteps, (b,), generator=gen)}
        rows = self.data.prompt_index[idx].clone()
        if self.train_text_encoder:
            rows[drop] = len(self.data.prompts)  # the "" row
            return {**batch, "prompt_rows": rows}
        embeds = self.embeds[rows].clone()
        embeds[drop] = self.null
        return {**batch, "embeds": embeds}

    def networks(self) -> dict[str, nn.Module]:
        c = self.components
        return {"unet": self.trainable.unet, "text encoder": c.text_encoder, "vae": c.vae}

    def final_components(self) -> Components:
        self.components.text_encoder.eval()
        return dataclasses.replace(self.components, unet=merged_unet(self.trainable.unet))

    def save_model(self, folder: Path) -> Path:
        from llcm.model_folder import ModelConfig
        from llcm.pipeline import save_model_folder

        cfg = ModelConfig(classes=list(dict.fromkeys(self.data.prompts)), source=data_source("teacher", self.data),
                          latent_mean=channel_mean(self.data.latents))
        return save_model_folder(self.final_components(), self.schedule, cfg, folder, overwrite=True,
                                 pipeline_class="StableDiffusionPipeline")

    @torch.no_grad()
    def sample_grid(self):
        from llcm.images import make_grid
        from llcm.pipeline import decode_latents
        from llcm.sampling import cfg_denoiser, make_generators, sample_ode, teacher_timesteps

        c = self.components
        unet = self.trainable.unet
        was = unet.training
        unet.eval()
        p = self.sample_prompts
        device = next(unet.parameters()).device
        table = prompt_table(c, p + [""]).to(device)  # fresh: the text encoder may be training
        emb, null = table[:-1], table[-1:]
        den = cfg_denoiser(unet, self.schedule, c.prediction_type, emb, null.expand_as(emb), 4.0)
        shape = tuple(self.data.latents.shape[1:])
        z = sample_ode(den, self.schedule, "ddim", make_generators(range(len(p))), shape, teacher_timesteps(20),
                       latent_mean=channel_mean(self.data.latents),
                       device=device)
        unet.train(was)
        from PIL import Image
        import numpy as np

        imgs = decode_latents(c, z)
        return make_grid([Image.fromarray((i * 255).round().astype(np.uint8)) for i in imgs])


class _ConsistencyTask(_PromptData):
    """Shared by distillation and LCF: student f_theta with w input, EMA target f_theta^-."""

    def __init__(self, components: Components, data: LatentSet, schedule: Schedule | None, k: int,
                 w_min: float, w_max: float, ema_decay: float, lora_rank: int, student_unet: nn.Module,
                 k_start: int | None = None, k_ramp: float = 0.5):
        super().__init__(components, data)
        self.schedule = schedule or Schedule.scaled_linear()
        n = self.schedule.num_train_timesteps
        if not 1 <= k < n:
            raise UserError(f"skipping interval k={k} must be between 1 and {n - 1} (schedule length {n})")
        if w_min > w_max:
            raise UserError(f"w_min ({w_min}) must not exceed w_max ({w_max})")
        if w_min < 0:
            raise UserError(f"w_min must be >= 0 (LCM form), got {w_min}")
        if not 0 <= ema_decay < 1:
            raise UserError(f"ema_decay must be in [0, 1), got {ema_decay}")
        if k_start is not None and not k <= k_start <= n:
            raise UserError(f"k_start={k_start} must be between k ({k}) and the schedule length {n}")
        if not 0 < k_ramp <= 1:
            raise UserError(f"k_ramp must be in (0, 1], got {k_ramp}")
        self.k, self.w_min, self.w_max, self.ema_decay = k, w_min, w_max, ema_decay
        self.k_start, self.k_ramp = k_start, k_ramp
        self.grayscale_inherited: list[str] = []  # a fine-tuned model keeps its base's grayscale classes
        self.grid = self.schedule.skipping_grid(k)
        if lora_rank:
            add_lora(student_unet, lora_rank)
            cond_proj = getattr(student_unet.time_embedding, "cond_proj", None)
            if cond_proj is not None:  # the w embedding is new: it trains in full
                cond_proj.requires_grad_(True)
        student_unet.train()
        pt = components.prediction_type
        self.trainable = ConsistencyModel(student_unet, self.schedule, pt)
        self.target = ConsistencyModel(copy.deepcopy(student_unet), self.schedule, pt).requires_grad_(False)
        self.target.eval()
        self.sample_prompts = list(dict.fromkeys(data.prompts))[:8]

    def k_now(self) -> int:
        """The skipping interval at this step: k, or with k_start a geometric decay from k_start to k over
        the first k_ramp of the run (easy consistency tuning's curriculum: wide intervals, i.e. nearly
        denoising, first; the consistency intervals last)."""
        if not self.k_start or self.k_start == self.k:
            return self.k
        frac = min(1.0, self.step / max(1.0, self.k_ramp * self.max_steps))
        return int(round(self.k_start * (self.k / self.k_start) ** frac))

    def draw(self, idx: Tensor, gen: torch.Generator) -> dict[str, Tensor]:
        b = len(idx)
        z0 = read_rows(self.data.latents, idx, self.local_rows)
        k = self.k_now()
        grid = self.grid if k == self.k else self.schedule.skipping_grid(k)
        n = torch.randint(0, len(grid), (b,), generator=gen)
        t = grid[n]
        return {"z0": z0, "noise": torch.randn(z0.shape, generator=gen), "t": t, "s": (t - k).clamp(min=0),
                "w": self.w_min + (self.w_max - self.w_min) * torch.rand(b, generator=gen),
                "embeds": self.embeds[self.data.prompt_index[idx]],
                "null_embeds": self.null.expand(b, -1, -1)}

    @torch.no_grad()
    def after_step(self) -> None:
        # theta^- <- stopgrad(mu theta^- + (1 - mu) theta)
        for p_t, p in zip(self.target.parameters(), self.trainable.parameters()):
            p_t.lerp_(p.detach().to(p_t.dtype), 1.0 - self.ema_decay)

    def state_modules(self) -> dict[str, nn.Module]:
        return {"target": self.target}

    def networks(self) -> dict[str, nn.Module]:
        c = self.components
        return {"student": self.trainable.unet, "target": self.target.unet, "text encoder": c.text_encoder,
                "vae": c.vae}

    def half_networks(self) -> tuple[str, ...]:
        # EMA 0: the target is a copy of the student, which autocast rounds the same way at every call. With an
        # EMA (decay > 0) it stays fp32: at lr 8e-6 and decay 0.95 each update (5% of a ~1e-4 gap) is below half
        # precision's resolution, and a bf16 target fell 35x its lag behind an fp32 one (docs/scale.md)
        return ("target",) if self.ema_decay == 0 else ()

    def final_components(self) -> Components:
        return dataclasses.replace(self.components, unet=merged_unet(self.trainable.unet))

    def llcm_config(self):
        from llcm.model_folder import LLCMConfig

        return LLCMConfig(k=self.k, w_min=self.w_min, w_max=self.w_max,
                          w_default=round(min(max(7.0, self.w_min), self.w_max), 3),
                          solver=getattr(self, "solver_name", "none (LCF)"),
                          classes=list(dict.fromkeys(self.data.prompts)),
                          source=data_source(self.name, self.data),
                          latent_mean=channel_mean(self.data.latents),
                          grayscale=sorted(set(self.data.meta.get("grayscale", [])) | set(self.grayscale_inherited)))

    def save_model(self, folder: Path) -> Path:
        from llcm.pipeline import save_model_folder

        return save_model_folder(self.final_components(), self.schedule, self.llcm_config(), folder, overwrite=True)

    @torch.no_grad()
    def sample_grid(self):
        import numpy as np
        from PIL import Image

        from llcm.images import make_grid
        from llcm.pipeline import decode_latents
        from llcm.sampling import consistency_timesteps, make_generators, sample_consistency

        model = self.trainable
        was = model.training
        model.eval()
        p = self.sample_prompts
        emb = prompt_table(self.components, p).to(next(model.parameters()).device)
        shape = tuple(self.data.latents.shape[1:])
        w = 0.5 * (self.w_min + self.w_max)
        z = sample_consistency(model, emb, w, make_generators(range(len(p))), shape,
                               consistency_timesteps(4, self.schedule.num_train_timesteps, self.k),
                               latent_mean=channel_mean(self.data.latents))
        model.train(was)
        imgs = decode_latents(self.components, z)
        return make_grid([Image.fromarray((i * 255).round().astype(np.uint8)) for i in imgs])


class DistillTask(_ConsistencyTask):
    name = "distill"

    def __init__(self, teacher: Components, data: LatentSet, solver: str = "leapfrog", k: int = 20,
                 w_min: float = 5.0, w_max: float = 15.0, ema_decay: float = 0.95, metric: str = "huber",
                 huber_c: float = 0.001, lora_rank: int = 0, schedule: Schedule | None = None,
                 guidance_dim: int = 256, student: nn.Module | None = None):
        """`student`: start from this trained LLCM/LCM UNet (with a w-embedding, the teacher's architecture)
        instead of the teacher's weights, e.g. to carry a distillation over to a fine-tuned teacher."""
        if teacher.text_encoder is None:
            raise UserError("distillation needs a text-conditioned teacher (no text encoder found)")
        if getattr(teacher.unet.config, "time_cond_proj_dim", None):
            raise UserError("the teacher's UNet has a guidance (w) embedding: it is a distilled consistency model "
                            "(LLCM/LCM), not a diffusion teacher; give the diffusion model it was distilled from "
                            "(--student takes a consistency model to start from)")
        self.solver_name = solver
        solver_fn = get_solver(solver)
        teacher.unet.requires_grad_(False).eval()
        teacher.vae.requires_grad_(False)
        teacher.text_encoder.requires_grad_(False)
        if student is None:
            student = add_guidance_embedding(teacher.unet, guidance_dim)
        else:
            _check_student(student, teacher.unet)
        if lora_rank:
            student.requires_grad_(False)
        super().__init__(teacher, data, schedule, k, w_min, w_max, ema_decay, lora_rank, student)
        self.loss_fn = ConsistencyDistillationLoss(teacher.unet, self.target, solver_fn, self.schedule,
                                                   teacher.prediction_type, metric, huber_c)

    def networks(self) -> dict[str, nn.Module]:
        nets = super().networks()
        return {"student": nets.pop("student"), "teacher": self.components.unet, **nets}

    def half_networks(self) -> tuple[str, ...]:
        return ("teacher", *super().half_networks())  # frozen, forward only


def _check_student(student: nn.Module, teacher_unet: nn.Module) -> None:
    """A given student must be the teacher's architecture plus a w-embedding."""
    if not getattr(student.config, "time_cond_proj_dim", None):
        raise UserError("the --student UNet has no guidance embedding (time_cond_proj_dim): give a trained "
                        "LLCM/LCM folder, or leave --student out to start from the teacher")
    skip = {"time_cond_proj_dim", "_name_or_path", "_diffusers_version", "_use_default_values", "sample_size"}
    diff = sorted(k for k in set(student.config) | set(teacher_unet.config)
                  if k not in skip and student.config.get(k) != teacher_unet.config.get(k))
    if diff:
        raise UserError(f"the --student UNet differs from the teacher's architecture in {', '.join(diff)}")


class FinetuneTask(_ConsistencyTask):
    """LCF. `adapter_base` (with `lora_rank`): save a small adapter folder naming this base (llcm.adapter)
    instead of a merged full UNet. `replay`: latents (with their prompts) of which a share `replay_fraction`
    of every batch is made, so the base's classes are kept (llcm.replay)."""

    name = "finetune"

    def __init__(self, model: Components, data: LatentSet, k: int = 20, w_min: float = 5.0, w_max: float = 15.0,
                 ema_decay: float = 0.95, metric: str = "huber", huber_c: float = 0.001, lora_rank: int = 0,
                 schedule: Schedule | None = None, adapter_base: str | None = None,
                 replay: LatentSet | None = None, replay_fraction: float = 0.0, replay_cache: Path | None = None,
                 k_start: int | None = None, k_ramp: float = 0.5, base_grayscale: list[str] | None = None):
        from llcm.models import model_hash
        from llcm.replay import check_fraction

        if not getattr(model.unet.config, "time_cond_proj_dim", None):
            raise UserError("LCF fine-tunes a trained LLCM/LCM (a UNet with a guidance embedding); "
                            "this model has none: distil it first with `llcm distill`")
        check_fraction(replay_fraction)
        if replay is not None and replay.latents.shape[1:] != data.latents.shape[1:]:
            raise UserError(f"replay latents are {tuple(replay.latents.shape[1:])}, the new latents "
                            f"{tuple(data.latents.shape[1:])}: both must come from this model's VAE at one size")
        self.adapter_base = adapter_base if lora_rank else None
        self.base_hash = model_hash(model.unet) if self.adapter_base else None
        self.replay = replay if replay_fraction > 0 else None
        self.replay_fraction, self.replay_cache = replay_fraction, replay_cache
        model.vae.requires_grad_(False)
        model.text_encoder.requires_grad_(False)
        frozen = copy.deepcopy(model.unet).requires_grad_(False).eval() if self.replay is not None else None
        super().__init__(model, data, schedule, k, w_min, w_max, ema_decay, lora_rank, model.unet, k_start, k_ramp)
        # replay rows are held to the frozen base's output (ConsistencyFinetuneLoss)
        self.base = None if frozen is None else ConsistencyModel(frozen, self.schedule, model.prediction_type)
        self.loss_fn = ConsistencyFinetuneLoss(self.target, self.schedule, metric, huber_c, base=self.base)
        self.grayscale_inherited = list(base_grayscale or [])
        if self.replay is not None:
            self.replay_embeds = prompt_table(model, list(self.replay.prompts))
            new = list(dict.fromkeys(data.prompts))
            self.sample_prompts = (new + [p for p in dict.fromkeys(self.replay.prompts) if p not in new])[:8]

    def networks(self) -> dict[str, nn.Module]:
        return {**super().networks(), **({"base": self.base.unet} if self.base is not None else {})}

    def half_networks(self) -> tuple[str, ...]:
        return (*super().half_networks(), *(("base",) if self.base is not None else ()))  # frozen, forward only

    def draw(self, idx: Tensor, gen: torch.Generator) -> dict[str, Tensor]:
        """The LCF batch, then a share of its rows (random positions) replaced by random replay latents and
        their prompts; every choice comes from `gen`, for the global batch."""
        from llcm.replay import replay_rows

        r = replay_rows(len(idx), self.replay_fraction) if self.replay is not None else 0
        if r == 0:
            return super().draw(idx, gen)
        pos = torch.randperm(len(idx), generator=gen)[:r]
        pick = torch.randint(len(self.replay), (r,), generator=gen)
        batch = super().draw(idx, gen)
        mine = torch.zeros(len(idx), dtype=torch.bool)
        mine[self.local_rows] = True
        here = mine[pos]  # replay latents are read for this process's rows only
        batch["z0"][pos[here]] = self.replay.latents[pick[here]]
        batch["embeds"][pos] = self.replay_embeds[self.replay.prompt_index[pick]]
        batch["replay"] = torch.zeros(len(idx), dtype=torch.bool)
        batch["replay"][pos] = True
        return batch

    def begin(self, out: Path) -> None:
        if self.replay is not None and self.replay_cache is not None:
            self.replay.save(self.replay_cache)  # sampled at the start of this run: --resume reuses them

    def llcm_config(self):
        cfg = super().llcm_config()
        if self.replay is None:
            return cfg
        f = self.replay_fraction  # the mixture's per-channel mean is what the model saw in training
        mean = [(1 - f) * a + f * b for a, b in zip(cfg.latent_mean, channel_mean(self.replay.latents))]
        cfg.latent_mean = [round(v, 6) for v in mean]
        cfg.classes = list(dict.fromkeys(cfg.classes + list(self.replay.prompts)))
        meta = {k: v for k, v in self.replay.meta.items() if k in ("origin", "base_hash", "per_class", "seed",
                                                                     "steps", "w", "source", "data_hash")}
        meta.update({k: record_name(meta[k]) for k in ("origin", "source") if k in meta})  # older caches: paths
        cfg.source["replay"] = {"fraction": f, "latents": len(self.replay), "classes": list(self.replay.prompts),
                                **meta}
        return cfg

    def save_model(self, folder: Path) -> Path:
        if not self.adapter_base:
            return super().save_model(folder)
        from llcm.adapter import save_adapter
        from llcm.pipeline import lcm_scheduler_config

        cfg = self.llcm_config()
        sched = lcm_scheduler_config(self.schedule, self.components.prediction_type, cfg.k, cfg.timestep_scaling)
        return save_adapter(self.trainable.unet, folder, dict(cfg.__dict__), self.adapter_base, self.base_hash, sched)
