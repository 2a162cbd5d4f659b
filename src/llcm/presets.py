"""Presets (``llcm/configs/*.json``) and the training defaults they set, in one torch-free place.

Both the CLI (for ``--help`` text and unset options) and the library read the defaults from here, so a
default is written once: in the preset's section, or in :data:`FALLBACKS` when the preset leaves it out.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from llcm.errors import UserError

DEFAULT_PRESET = "tiny-cpu"

# What a training command uses when its preset section does not say (steps, global batch, learning rate);
# the consistency settings are those of the LCM paper (k 20, EMA 0.95, w in [5, 15], pseudo-Huber c 0.001).
FALLBACKS = {"teacher": {"steps": 2000, "batch": 64, "lr": 2e-4},
             "distill": {"steps": 1000, "batch": 32, "lr": 1e-4},
             "finetune": {"steps": 500, "batch": 32, "lr": 5e-5}}
CONSISTENCY = {"ema_decay": 0.95, "k": 20, "w_min": 5.0, "w_max": 15.0, "huber_c": 0.001, "loss": "huber"}


def _configs_dir() -> Any:
    return resources.files("llcm") / "configs"


def list_presets() -> list[str]:
    """Names of the presets shipped in ``llcm/configs``."""
    return sorted(p.name[: -len(".json")] for p in _configs_dir().iterdir() if p.name.endswith(".json"))


def load_preset(name: str) -> dict:
    """Return a fresh dict for a named preset (or for a path to a preset-style ``.json`` file)."""
    if name.endswith(".json") and Path(name).is_file():
        return json.loads(Path(name).read_text(encoding="utf-8"))
    entry = _configs_dir() / f"{name}.json"
    if not entry.is_file():
        raise UserError(f"unknown preset {name!r}; available: {', '.join(list_presets())}")
    return json.loads(entry.read_text(encoding="utf-8"))


def training_defaults(name: str | None, section: str) -> dict:
    """Training defaults of a preset section ("teacher", "distill", "finetune"), with the fallbacks above.

    name=None is the default preset. The preset itself is returned too, under "preset"."""
    preset = load_preset(name or DEFAULT_PRESET)
    sec, base = preset.get(section, {}), FALLBACKS[section]
    return {
        "steps": sec.get("steps", base["steps"]), "batch": sec.get("global_batch_size", base["batch"]),
        "lr": sec.get("learning_rate", base["lr"]), "ema_decay": sec.get("ema_decay", CONSISTENCY["ema_decay"]),
        "k": sec.get("skipping_interval_k", CONSISTENCY["k"]), "w_min": sec.get("w_min", CONSISTENCY["w_min"]),
        "w_max": sec.get("w_max", CONSISTENCY["w_max"]), "huber_c": sec.get("huber_c", CONSISTENCY["huber_c"]),
        "loss": sec.get("loss", CONSISTENCY["loss"]), "preset": preset,
        "lr_schedule": sec.get("lr_schedule", "constant"),
    }
