"""Prompt(s) -> images with a latent consistency model in 1-50 steps; save, load and export.

A saved llcm model IS a diffusers folder: `model_index.json` names LatentConsistencyModelPipeline,
the components sit in `unet/ vae/ text_encoder/ tokenizer/ scheduler/` as safetensors + configs, and
`llcm.json` adds what diffusers has no field for (trained w range, skipping interval k, the prompts
and classes the model was trained on, provenance). diffusers' `LatentConsistencyModelPipeline
.from_pretrained(folder)` loads it and, with guidance_scale = w + 1 and the same generators, gives the
same images (see tests/test_export.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from llcm import __version__
from llcm.consistency import ConsistencyModel
from llcm.errors import UserError
from llcm.fileio import atomic_folder
from llcm.images import luminance_rgb
from llcm.model_folder import LLCMConfig, ModelConfig, read_config, read_schedule
from llcm.attention import use_shared_prompt_attention
from llcm.models import Components, encode_prompts, load_components, model_hash
from llcm.presets import MAX_BATCH, MAX_W
from llcm.sampling import consistency_timesteps, make_generators, max_steps, sample_consistency
from llcm.schedules import Schedule

if TYPE_CHECKING:
    from llcm.hub import HubSnapshot


@dataclass
class Generation:
    images: np.ndarray  # [B, H, W, 3] float32 in [0, 1]
    prompts: list[str]
    seeds: list[int]
    steps: int
    w: float
    timesteps: list[int]
    model_hash: str

    def pil_images(self):
        from PIL import Image

        return [Image.fromarray((img * 255).round().clip(0, 255).astype(np.uint8)) for img in self.images]


class LLCMPipeline:
    def __init__(self, components: Components, config: LLCMConfig | None = None, schedule: Schedule | None = None,
                 name: str = "llcm"):
        self.components = components
        self.config = config or LLCMConfig()
        self.schedule = schedule or Schedule.scaled_linear()
        self.name = name
        if not getattr(components.unet.config, "time_cond_proj_dim", None):
            warnings.warn("this UNet has no guidance embedding (time_cond_proj_dim): w is ignored")
        self.model = ConsistencyModel(components.unet, self.schedule, components.prediction_type,
                                      self.config.sigma_data, self.config.timestep_scaling)
        self._hash: str | None = None
        if hasattr(components.unet, "set_attn_processor"):  # a batch of one prompt attends to it once
            use_shared_prompt_attention(components.unet)

    # ----------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, base: str | os.PathLike | None = None) -> "LLCMPipeline":
        """Load a local llcm or diffusers LCM folder, or an adapter folder (never the network).

        An adapter is merged into its recorded base, or into `base` when given (llcm.adapter)."""
        from llcm.adapter import load_adapted

        path = Path(path)
        config, schedule = read_config(path), read_schedule(path)  # the small files first: a bad one fails fast
        components = load_components(path) if base is None else load_adapted(path, base)
        name = path.parent.name if path.name == "model" and path.parent.name else path.name  # runs/x/model -> x
        return cls(components, config, schedule, name=name)

    @property
    def model_hash(self) -> str:
        if self._hash is None:
            self._hash = model_hash(self.components)
        return self._hash

    @property
    def device(self) -> torch.device:
        return next(self.components.unet.parameters()).device

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "LLCMPipeline":
        """Move (and optionally cast: torch.float16 / torch.bfloat16 on a GPU) every model; returns self.

        The model hash stays the one of the weights as loaded (computed before any cast)."""
        if dtype is not None:
            _ = self.model_hash
        self.components.to(device, dtype)
        return self

    def default_size(self) -> int:
        c = self.components
        return int(c.unet.config.sample_size) * c.vae_scale_factor

    # ----------------------------------------------------------------------------- generation
    def check_request(self, steps: int, w: float, height: int, width: int, batch: int) -> list[str]:
        """Raise UserError for a request the model cannot serve; warn for w outside the trained range (advice,
        not a limit) and return those warnings' texts."""
        hi = max_steps(self.schedule.num_train_timesteps, self.config.k)
        if not 1 <= steps <= hi:
            raise UserError(f"steps must be between 1 and {hi}, got {steps}")
        if not 1 <= batch <= MAX_BATCH:
            raise UserError(f"batch must be between 1 and {MAX_BATCH}, got {batch}")
        f = self.components.vae_scale_factor
        for name, v in (("height", height), ("width", width)):
            if v <= 0 or v % f:
                raise UserError(f"{name} must be a positive multiple of the VAE factor {f}, got {v}")
        if not 0 <= w <= MAX_W:  # NaN fails too
            raise UserError(f"w must be a number between 0 and {MAX_W:g} (LCM form; guidance scale = 1 + w), got {w}")
        advice = [] if self.config.w_min <= w <= self.config.w_max else [
            f"w={w} is outside the trained range [{self.config.w_min}, {self.config.w_max}]; "
            "images may be over- or under-guided"]
        for text in advice:
            warnings.warn(text)
        return advice

    @torch.no_grad()
    def __call__(self, prompts: str | Sequence[str], steps: int = 4, seeds: Sequence[int] | int | None = None,
                 w: float | None = None, height: int | None = None, width: int | None = None,
                 timesteps: Sequence[int] | None = None, keep_colour: bool = False) -> Generation:
        """Images for prompts and seeds. A prompt of a grayscale class (config.grayscale) gives its samples'
        luminance unless keep_colour."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if seeds is None:
            seeds = 0
        if isinstance(seeds, int):
            seeds = [seeds + i for i in range(len(prompts))]
        seeds = [int(s) for s in seeds]
        if len(seeds) != len(prompts):
            raise UserError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
        w = self.config.w_default if w is None else float(w)
        ts, z0 = self.sample_latents(prompts, steps, seeds, w, height, width, timesteps)
        images = decode_latents(self.components, z0)
        gray = [i for i, p in enumerate(prompts) if p in self.config.grayscale]
        if gray and not keep_colour:
            images[gray] = luminance_rgb(images[gray])
        return Generation(images, prompts, seeds, steps, w, ts, self.model_hash)

    @torch.no_grad()
    def sample_latents(self, prompts: list[str], steps: int, seeds: list[int], w: float, height: int | None = None,
                       width: int | None = None,
                       timesteps: Sequence[int] | None = None) -> tuple[list[int], torch.Tensor]:
        """(timesteps, scaled latents z0) for one prompt and seed per image, before the VAE decodes them."""
        height = self.default_size() if height is None else height
        width = self.default_size() if width is None else width
        self.check_request(steps, w, height, width, len(prompts))
        c = self.components
        ts = list(timesteps) if timesteps else consistency_timesteps(steps, self.schedule.num_train_timesteps,
                                                                     self.config.k)
        distinct = list(dict.fromkeys(prompts))  # a batch of one prompt encodes it once, and is passed as one
        table = encode_prompts(c, distinct)     # row expanded (llcm.attention attends to it once)
        embeds = (table[:1].expand(len(prompts), -1, -1) if len(distinct) == 1
                  else table[[distinct.index(p) for p in prompts]])
        shape = (c.unet.config.in_channels, height // c.vae_scale_factor, width // c.vae_scale_factor)
        return ts, sample_consistency(self.model, embeds, w, make_generators(seeds), shape, ts,
                                      latent_mean=self.config.latent_mean)

    # ----------------------------------------------------------------------------- saving
    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write a diffusers LatentConsistencyModelPipeline folder + llcm.json, atomically."""
        return save_model_folder(self.components, self.schedule, self.config, path, overwrite)

    export = save  # an llcm folder is already a diffusers folder


def decode_latents(components: Components, z0: torch.Tensor) -> np.ndarray:
    """VAE-decode scaled latents to [B, H, W, 3] floats in [0, 1] (as diffusers' image processor does)."""
    vae = components.vae
    image = vae.decode(z0.to(vae.device, vae.dtype) / components.scaling_factor).sample
    image = (image / 2 + 0.5).clamp(0, 1)
    return image.cpu().permute(0, 2, 3, 1).float().numpy()


def lcm_scheduler_config(schedule: Schedule, prediction_type: str, k: int | None,
                         timestep_scaling: float = 10.0) -> dict:
    """A model folder's scheduler config: LCMScheduler's for a consistency model distilled with skipping interval
    k; with k None, a teacher's DDIMScheduler config, without LCM's fields (original_inference_steps,
    timestep_scaling)."""
    lcm = {} if k is None else {"original_inference_steps": schedule.num_train_timesteps // k,
                                "timestep_scaling": timestep_scaling}
    return {"_class_name": "LCMScheduler" if lcm else "DDIMScheduler", **schedule.to_diffusers_config(),
            "prediction_type": prediction_type, **lcm, "set_alpha_to_one": True, "clip_sample": False,
            "thresholding": False, "steps_offset": 0, "timestep_spacing": "leading", "rescale_betas_zero_snr": False}


def save_model_folder(components: Components, schedule: Schedule, config: ModelConfig, path: str | os.PathLike,
                      overwrite: bool = False, pipeline_class: str = "LatentConsistencyModelPipeline") -> Path:
    """Save components as a diffusers folder: written to a temporary sibling, then renamed into place.

    Any other pipeline_class (a teacher's StableDiffusionPipeline) saves a teacher: its llcm.json holds only
    the fields of :class:`~llcm.model_folder.ModelConfig` (``config`` may be one), its scheduler is DDIM's."""
    from llcm.fileio import drop_load_paths
    from llcm.model_folder import ModelConfig

    lcm = pipeline_class == "LatentConsistencyModelPipeline"
    path = Path(path)
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise UserError(f"{path} exists and is not empty; choose another folder or pass overwrite")
    with atomic_folder(path) as tmp:
        c = components
        c.unet.save_pretrained(tmp / "unet", safe_serialization=True)
        c.vae.save_pretrained(tmp / "vae", safe_serialization=True)
        c.text_encoder.save_pretrained(tmp / "text_encoder", safe_serialization=True)
        c.tokenizer.save_pretrained(tmp / "tokenizer")
        drop_load_paths(tmp)
        (tmp / "scheduler").mkdir()
        sched = lcm_scheduler_config(schedule, c.prediction_type, config.k if lcm else None,
                                     getattr(config, "timestep_scaling", 10.0))
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2))
        index = {
            "_class_name": pipeline_class, "_diffusers_version": _diffusers_version(),
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": ["transformers", type(c.text_encoder).__name__],
            "tokenizer": ["transformers", type(c.tokenizer).__name__],
            "scheduler": ["diffusers", sched["_class_name"]],
            "safety_checker": [None, None], "feature_extractor": [None, None], "image_encoder": [None, None],
            "requires_safety_checker": False,
        }
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
        fields = config.__dict__ if lcm else {k: getattr(config, k) for k in ModelConfig.__dataclass_fields__}
        meta = {**fields, "llcm_version": __version__, "unet_hash": model_hash(c)}
        (tmp / "llcm.json").write_text(json.dumps(meta, indent=2))
    return path


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


DEFAULT_MODEL = "default"  # the --model name of the model shipped with llcm


def default_model_path() -> Path | None:
    """The model shipped inside the package (llcm/default_model), if this install has it."""
    p = Path(__file__).parent / "default_model"
    return p if (p / "model_index.json").exists() else None


def resolve_model(spec: str | os.PathLike) -> Path:
    """A --model argument as a folder: "default" names the model shipped with llcm, an existing path is that
    folder, and a Hugging Face id ``org/name[@revision]`` is its snapshot in the local HF cache (:mod:`llcm.hub`;
    a local folder spelled like an id wins). Anything else comes back as a path, which the caller checks.

    Every command that takes a model folder resolves it here, so each spelling means the same everywhere."""
    if os.fspath(spec) == DEFAULT_MODEL:
        path = default_model_path()
        if path is None:
            raise UserError("this llcm install has no default model (llcm/default_model is missing); "
                            "pass a model folder instead")
        return path
    snapshot = hub_snapshot(spec)
    return Path(spec).expanduser() if snapshot is None else snapshot.folder


def model_record(spec: str | os.PathLike) -> str:
    """How saved records name the model a --model argument names: "default", a Hugging Face id pinned to its
    cached commit (``org/name@<commit>``), or a folder by :func:`llcm.fileio.record_name` (never absolute)."""
    from llcm.fileio import record_name

    try:
        snapshot = hub_snapshot(spec)
    except UserError:  # not in the cache: the command that loads it says so
        snapshot = None
    return record_name(spec) if snapshot is None else snapshot.record


def hub_snapshot(spec: str | os.PathLike) -> HubSnapshot | None:
    """The Hugging Face snapshot a --model argument names (:func:`llcm.hub.find_snapshot`): None for an existing
    local path (it wins over an id of the same spelling) or anything not spelled org/name[@revision]; a
    UserError for an id that the local cache lacks."""
    from llcm.hub import find_snapshot

    return None if Path(spec).expanduser().exists() else find_snapshot(spec)


def load_pipeline(spec: str | None = None, adapter: str | os.PathLike | None = None) -> LLCMPipeline:
    """A pipeline from a local folder, "default", a Hugging Face id in the local cache (org/name[@revision]), a
    preset name (untrained weights) or, when None, the default model (the tiny preset, with a warning, if this
    install has none).

    `adapter`: an adapter folder merged into `spec` (default: into the base the adapter records)."""
    from llcm.models import add_guidance_embedding, build_tiny_components, list_presets, load_preset

    if adapter is not None:
        from llcm.adapter import adapter_record

        base = adapter_record(adapter)["base"] if spec is None else spec
        return LLCMPipeline.from_pretrained(adapter, base=resolve_model(base))
    if spec is None:
        path = default_model_path()
        if path is None:
            warnings.warn("no trained default model in this install; using the untrained tiny-cpu preset")
            spec = "tiny-cpu"
        else:
            return LLCMPipeline.from_pretrained(path)
    p = resolve_model(spec)
    if p.exists():
        pipe = LLCMPipeline.from_pretrained(p)
        if hub_snapshot(spec) is not None:  # named by id@commit, not by its snapshot folder's name
            pipe.name = model_record(spec)
        return pipe
    if spec in list_presets():
        preset = load_preset(spec)
        if preset.get("source") != "configs":  # sd15, sd21-base: describe checkpoints the user must have
            raise UserError(f"preset {spec!r} needs a local model folder; pass --model PATH")
        comps = build_tiny_components(preset, seed=0)
        comps = dataclasses.replace(comps, unet=add_guidance_embedding(comps.unet))
        return LLCMPipeline(comps, LLCMConfig(), name=spec)
    raise UserError(f"model {spec!r} is neither a local folder, a Hugging Face id (org/name) nor a preset "
                    f"({', '.join(list_presets())}); llcm never downloads models")
