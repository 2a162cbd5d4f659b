"""Latents computed once and cached: a folder with `latents.safetensors` + `latents.json`.

latents.safetensors: "latents" [N, C, h, w] (already multiplied by the VAE scaling factor) and
"prompt_index" [N] (row of latents.json "prompts"). latents.json records the prompts, the class of
each prompt, the VAE hash the latents came from (a different VAE never reuses stale latents),
the scaling factor, the split and whether horizontal flips were added (never by default: medical
left/right matters).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from llcm.errors import UserError

Tensor = torch.Tensor


def channel_mean(latents: torch.Tensor) -> list[float]:
    """Per-channel mean of [N, C, h, w] latents, as stored in llcm.json (``latent_mean``)."""
    return [round(float(v), 6) for v in latents.double().mean((0, 2, 3))]


@dataclass
class LatentSet:
    latents: Tensor  # [N, C, h, w] float
    prompt_index: Tensor  # [N] long
    prompts: list[str]
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.latents.shape[0])

    @property
    def classes(self) -> list[str]:
        return self.meta.get("classes", self.prompts)

    def save(self, folder: str | os.PathLike) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / "latents.safetensors.tmp"
        save_file({"latents": self.latents.contiguous(), "prompt_index": self.prompt_index.contiguous()}, str(tmp))
        os.replace(tmp, folder / "latents.safetensors")
        meta = {**self.meta, "prompts": self.prompts, "count": len(self), "shape": list(self.latents.shape[1:])}
        (folder / "latents.json.tmp").write_text(json.dumps(meta, indent=2))
        os.replace(folder / "latents.json.tmp", folder / "latents.json")
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike, expect_vae_hash: str | None = None) -> "LatentSet":
        folder = Path(folder)
        f, j = folder / "latents.safetensors", folder / "latents.json"
        if not f.exists() or not j.exists():
            raise UserError(f"{folder} is not a latent cache (latents.safetensors + latents.json); "
                            "create one with `llcm encode`")
        meta = json.loads(j.read_text())
        if expect_vae_hash and meta.get("vae_hash") not in (None, expect_vae_hash):
            raise UserError(f"latents in {folder} were made by VAE {meta.get('vae_hash')}, not {expect_vae_hash}; "
                            "re-run `llcm encode` with this model's VAE")
        t = load_file(str(f))
        lat, idx = t.get("latents"), t.get("prompt_index")
        if lat is None or idx is None or lat.ndim != 4 or idx.shape != lat.shape[:1]:
            raise UserError(f"{f} has the wrong layout: expected latents [N,C,h,w] and prompt_index [N]")
        return cls(lat.float(), idx.long(), meta.pop("prompts"), meta)

    def check_compatible(self, unet) -> None:
        c, h, w = self.latents.shape[1:]
        if c != unet.config.in_channels:
            raise UserError(f"latents have {c} channels but the UNet expects {unet.config.in_channels}")
        if h % 4 or w % 4:
            raise UserError(f"latent size {h}x{w} is not a multiple of 4")
