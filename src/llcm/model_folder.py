"""The one reader of a model folder's own files: llcm.json (-> :class:`LLCMConfig`) and the scheduler config
(-> :class:`~llcm.schedules.Schedule`). Pipeline, evaluation, fine-tuning, replay and adapters all read a
folder through here, so a missing or broken file means the same thing everywhere.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from llcm.errors import UserError
from llcm.presets import CONSISTENCY

META = "llcm.json"
SCHEDULER = Path("scheduler") / "scheduler_config.json"


@dataclass
class ModelConfig:
    """What every llcm model folder's llcm.json holds; a teacher's (or a DreamBooth model's) holds only this."""

    classes: list[str] = field(default_factory=list)  # prompts/classes seen in training
    # per-channel mean of the (scaled) training latents: samples start from noise whose channel means are
    # exactly sqrt(alpha_bar_T) mu (llcm.sampling.initial_latents); None for older folders and diffusers ones
    # (plain N(0, I))
    latent_mean: list[float] | None = None
    # prompts whose training images were grayscale: their samples are returned as luminance (llcm.images)
    grayscale: list[str] = field(default_factory=list)
    source: dict = field(default_factory=dict)  # provenance: task, data (a name) and data_hash, ...

    @classmethod
    def from_dict(cls, d: dict):
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class LLCMConfig(ModelConfig):
    """What a consistency model needs beyond its diffusers components (llcm.json)."""

    k: int = CONSISTENCY["k"]  # skipping interval the model was distilled with
    w_min: float = CONSISTENCY["w_min"]  # trained guidance range (LCM form; SD guidance scale = 1 + w)
    w_max: float = CONSISTENCY["w_max"]
    w_default: float = 7.0
    sigma_data: float = 0.5
    timestep_scaling: float = 10.0
    solver: str = "leapfrog"  # the distillation solver, for the record


def read_json(path: Path) -> dict:
    """A model folder's JSON file, which must hold an object; one clear line naming the file otherwise."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise UserError(f"{path} must hold a JSON object, not {type(value).__name__}")
    return value


def read_meta(folder: str | os.PathLike) -> dict:
    """The folder's llcm.json as a dict; {} for a folder without one (a plain diffusers model)."""
    path = Path(folder).expanduser() / META
    return read_json(path) if path.is_file() else {}


def read_config(folder: str | os.PathLike) -> LLCMConfig:
    """The folder's llcm.json as an :class:`LLCMConfig` (defaults for what it lacks); a value that would break
    sampling later (k 0, w_min > w_max, a NaN in latent_mean) is refused here, in one line naming the file."""
    config = LLCMConfig.from_dict(read_meta(folder))
    where = Path(folder).expanduser() / META

    def number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    if not (isinstance(config.k, int) and not isinstance(config.k, bool) and 1 <= config.k <= 1000):
        raise UserError(f"{where}: k must be a whole number from 1 to 1000, got {config.k!r}")
    ws = {"w_min": config.w_min, "w_max": config.w_max, "w_default": config.w_default,
          "sigma_data": config.sigma_data, "timestep_scaling": config.timestep_scaling}
    bad = next((name for name, v in ws.items() if not number(v)), None)
    if bad:
        raise UserError(f"{where}: {bad} must be a finite number, got {ws[bad]!r}")
    if not 0 <= config.w_min <= config.w_max:
        raise UserError(f"{where}: the trained w range must satisfy 0 <= w_min <= w_max, got "
                        f"[{config.w_min}, {config.w_max}]")
    if config.sigma_data <= 0:
        raise UserError(f"{where}: sigma_data must be positive, got {config.sigma_data}")
    mean = config.latent_mean
    if mean is not None and not (isinstance(mean, list) and mean and all(number(v) for v in mean)):
        raise UserError(f"{where}: latent_mean must be a list of finite numbers (one per latent channel) or null, "
                        f"got {json.dumps(mean)[:80]}")
    vae = Path(folder).expanduser() / "vae" / "config.json"
    channels = read_json(vae).get("latent_channels", 4) if mean is not None and vae.is_file() else None
    if channels is not None and len(mean) != channels:
        raise UserError(f"{where}: latent_mean has {len(mean)} values, the VAE ({vae}) has {channels} latent "
                        "channels")
    for name in ("classes", "grayscale"):
        value = getattr(config, name)
        if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise UserError(f"{where}: {name} must be a list of strings, got {json.dumps(value)[:80]}")
    return config


def check_files(folder: str | os.PathLike) -> None:
    """Refuse a folder with a damaged file (truncated, zeroed, not JSON), naming it, before diffusers or
    transformers read it: the JSON files and the safetensors headers of the folder and its subfolders."""
    from safetensors import SafetensorError, safe_open

    folder = Path(folder).expanduser()
    for path in sorted(folder.glob("*.json")) + sorted(folder.glob("*/*.json")):
        read_json(path)
    for path in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*/*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except (SafetensorError, OSError) as exc:
            raise UserError(f"{path} is not a readable safetensors file ({exc}): the model folder is damaged; "
                            "copy or save it again") from None


def read_schedule(folder: str | os.PathLike):
    """The folder's noise schedule (scheduler/scheduler_config.json); SD's scaled_linear when it has none."""
    from llcm.schedules import Schedule

    path = Path(folder).expanduser() / SCHEDULER
    if not path.is_file():
        return Schedule.scaled_linear()
    try:
        return Schedule.from_diffusers_config(read_json(path))
    except ValueError as exc:
        raise UserError(f"{path}: {exc}") from None
