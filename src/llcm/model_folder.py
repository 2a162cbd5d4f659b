"""The one reader of a model folder's own files: llcm.json (-> :class:`LLCMConfig`) and the scheduler config
(-> :class:`~llcm.schedules.Schedule`). Pipeline, evaluation, fine-tuning, replay and adapters all read a
folder through here, so a missing or broken file means the same thing everywhere.
"""

from __future__ import annotations

import json
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


def _json(path: Path) -> dict:
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
    return _json(path) if path.is_file() else {}


def read_config(folder: str | os.PathLike) -> LLCMConfig:
    return LLCMConfig.from_dict(read_meta(folder))


def read_schedule(folder: str | os.PathLike):
    """The folder's noise schedule (scheduler/scheduler_config.json); SD's scaled_linear when it has none."""
    from llcm.schedules import Schedule

    path = Path(folder).expanduser() / SCHEDULER
    if not path.is_file():
        return Schedule.scaled_linear()
    try:
        return Schedule.from_diffusers_config(_json(path))
    except ValueError as exc:
        raise UserError(f"{path}: {exc}") from None
