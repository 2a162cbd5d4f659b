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

# Limits of one generation request, the same for the pipeline, the server and the CLI's --help
MAX_STEPS = 50  # the most consistency steps (the paper's 1-50: the whole k = 20 grid)
MAX_BATCH = 64  # the most images in one call
MAX_SEED = 2**32 - 1  # torch's CPU generator keeps the low 32 bits of a seed: 2**32 + s would repeat seed s
MAX_SIZE = 4096  # the largest image side in pixels that generation accepts
MAX_TRAIN_STEPS = 100_000_000  # a larger --steps is a typo: at 10 steps/s it would run for more than 100 days
MAX_W = 100.0  # the largest guidance w (LCM form; guidance scale 101): far beyond any trained range, still finite

# Every key a preset may hold (tests/test_models.py checks the shipped ones hold no other): "name" (messages),
# "description" (for people), "source", "prediction_type" and the component configs (llcm.models.
# build_tiny_components / components_from_preset; "vae" also `llcm train vae`), and the training sections.
PRESET_KEYS = frozenset({"name", "description", "source", "prediction_type", "unet", "vae", "text_encoder",
                         "tokenizer", "teacher", "distill", "finetune"})
# A training section's keys -> the default each sets (all that training_defaults reads); "_why" is for people.
SECTION_KEYS = {"steps": "steps", "global_batch_size": "batch", "learning_rate": "lr", "lr_schedule": "lr_schedule",
                "ema_decay": "ema_decay", "skipping_interval_k": "k", "w_min": "w_min", "w_max": "w_max",
                "huber_c": "huber_c", "loss": "loss"}


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
    defaults = {**FALLBACKS[section], **CONSISTENCY, "lr_schedule": "constant"}
    defaults.update({SECTION_KEYS[k]: v for k, v in preset.get(section, {}).items() if k in SECTION_KEYS})
    return {**defaults, "preset": preset}
