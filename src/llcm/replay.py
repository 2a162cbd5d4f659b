"""Replay: keep the base model's classes during LCF by mixing their latents into every batch.

Fine-tuning on a new dataset alone pulls the weights towards it and the base's classes fade
(catastrophic forgetting). With ``llcm finetune --replay F`` a share F of every batch comes from
replay latents that carry their own prompts: the base's training latent cache when the user has it
(``--replay-latents``), else latents the base samples itself at the start of the run (4-step
consistency sampling of each class in its llcm.json, a fixed number per class, seeded; no VAE
decode), cached in the run folder so that ``--resume`` reuses them instead of sampling again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from llcm.errors import UserError

if TYPE_CHECKING:
    from llcm.latents import LatentSet

# torch is imported inside the functions: the CLI reads the constants below to build --help quickly
DEFAULT_FRACTION = 0.25  # the default of `llcm finetune --replay`: change it here, and only here
PER_CLASS = 32  # sampled replay latents per base class (--replay-per-class)
STEPS = 4  # consistency steps of the sampled replay
CACHE = "replay"  # sampled replay latents are cached in OUT/replay


def check_fraction(fraction: float) -> None:
    if not 0 <= fraction < 1:
        raise UserError(f"--replay is the share of each batch drawn from replay latents: 0 <= F < 1, got {fraction}")


def replay_rows(batch: int, fraction: float) -> int:
    """Rows of a batch of `batch` drawn from replay: round(fraction * batch), at least 1, and at least one new row."""
    if fraction <= 0 or batch < 2:
        return 0
    return min(batch - 1, max(1, round(fraction * batch)))


def sample_replay(components, config: dict, shape: tuple[int, ...], per_class: int, seed: int,
                  batch: int = 64) -> LatentSet:
    """Latents of each class in the base's llcm.json `config`, sampled by the base itself (no VAE decode).

    Image i of class c uses seed `seed * 1_000_003 + c * per_class + i`, so a cache can be checked and remade.
    """
    import torch

    from llcm.latents import LatentSet
    from llcm.models import model_hash
    from llcm.model_folder import LLCMConfig
    from llcm.pipeline import LLCMPipeline

    classes = list(dict.fromkeys(config.get("classes") or []))
    if not classes:
        raise UserError("the base model's llcm.json lists no classes to replay; give its training latents "
                        "with --replay-latents")
    if per_class < 1:
        raise UserError(f"--replay-per-class must be >= 1, got {per_class}")
    if not getattr(components.unet.config, "time_cond_proj_dim", None):
        raise UserError("replay sampling needs a trained LLCM/LCM (a UNet with a guidance embedding)")
    cfg = LLCMConfig.from_dict(config)
    pipe = LLCMPipeline(components, cfg)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe.to(device)
    prompts = [c for c in classes for _ in range(per_class)]
    seeds = [seed * 1_000_003 + i for i in range(len(prompts))]
    f = components.vae_scale_factor
    size = {"height": shape[1] * f, "width": shape[2] * f}
    chunks = [pipe.sample_latents(prompts[i:i + batch], STEPS, seeds[i:i + batch], cfg.w_default, **size)[1].cpu()
              for i in range(0, len(prompts), batch)]
    pipe.to("cpu")
    index = torch.arange(len(classes)).repeat_interleave(per_class)
    meta = {"origin": "sampled from the base", "base_hash": model_hash(components.unet), "per_class": per_class,
            "seed": seed, "steps": STEPS, "w": cfg.w_default, "shape": list(shape),
            "vae_hash": model_hash(components.vae)}
    return LatentSet(torch.cat(chunks).float(), index, classes, meta)


def load_or_sample(folder: Path, components, config: dict, shape: tuple[int, ...], per_class: int,
                   seed: int) -> tuple[LatentSet, bool]:
    """(replay latents, whether they are new): a cache in `folder` made with the same settings is reused.

    New latents are not written here: the run writes them once its folder exists (FinetuneTask.begin).
    """
    from llcm.latents import LatentSet
    from llcm.models import model_hash

    meta_file = folder / "latents.json"
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        want = {"base_hash": model_hash(components.unet), "per_class": per_class, "seed": seed, "steps": STEPS,
                "shape": list(shape), "prompts": list(dict.fromkeys(config.get("classes") or []))}
        if all(meta.get(k) == v for k, v in want.items()):
            return LatentSet.load(folder, expect_vae_hash=model_hash(components.vae)), False
    return sample_replay(components, config, shape, per_class, seed), True


def anchor_samples(spec: str, vae, per_class: int, seed: int, size: tuple[int, int]):
    """Unscaled latents a model samples for each of its classes (4 steps), for the VAE's decoder anchor."""
    from llcm.model_folder import read_meta
    from llcm.models import load_components
    from llcm.pipeline import resolve_model

    folder = resolve_model(spec)
    comps = load_components(folder)
    sf = float(vae.config.scaling_factor)
    if abs(comps.scaling_factor - sf) > 1e-6 * sf:
        raise UserError(f"--anchor-model {spec} scales its latents by {comps.scaling_factor}, the --init VAE by {sf}: "
                        "give the model trained on this VAE's latents")
    cfg = read_meta(folder)
    f = comps.vae_scale_factor
    shape = (comps.latent_channels, size[0] // f, size[1] // f)
    print(f"sampling {per_class} latents per class of {spec} for the decoder anchor")
    return sample_replay(comps, cfg, shape, per_class, seed).latents / sf
