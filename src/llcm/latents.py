"""Latents computed once and cached: a folder with `latents.safetensors` + `latents.json`.

latents.safetensors: "latents" [N, C, h, w] (already multiplied by the VAE scaling factor) and
"prompt_index" [N] (row of latents.json "prompts"). latents.json records the prompts, the class of
each prompt, the VAE hash the latents came from (a different VAE never reuses stale latents),
the scaling factor, the split, whether horizontal flips were added (never by default: medical
left/right matters) and the sha256 of latents.safetensors (a changed or damaged file is noticed).

A LatentSet is checked when it is made (so also when loaded) and again when saved: finite floating
latents [N, C, h, w], N >= 1, and an integer prompt_index [N] within the prompts. Nothing else
checks latents, so a NaN can never reach a model's llcm.json (``latent_mean``).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save_file

from llcm.errors import UserError

Tensor = torch.Tensor
REBUILD = "re-run `llcm encode --overwrite` to rebuild it"


def channel_mean(latents: torch.Tensor) -> list[float]:
    """Per-channel mean of [N, C, h, w] latents, as stored in llcm.json (``latent_mean``)."""
    return [round(float(v), 6) for v in latents.double().mean((0, 2, 3))]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class LatentSet:
    latents: Tensor  # [N, C, h, w] float
    prompt_index: Tensor  # [N] long
    prompts: list[str]
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        problem = self.problem()
        if problem:
            raise UserError(f"invalid latents: {problem}")
        self.prompt_index = self.prompt_index.long()

    def problem(self) -> str | None:
        """What makes these latents unusable, in a few words; None when they are fine."""
        lat, idx = self.latents, self.prompt_index
        if not torch.is_tensor(lat) or not torch.is_tensor(idx):
            return "latents and prompt_index must be tensors"
        if not lat.is_floating_point():
            return f"latents must be floating point, not {lat.dtype}"
        if lat.ndim != 4 or lat.shape[0] < 1 or 0 in lat.shape:
            return f"latents must be [N, C, h, w] with N >= 1, not {list(lat.shape)}"
        if not bool(torch.isfinite(lat).all()):
            return f"{int((~torch.isfinite(lat)).sum())} latent values are NaN or infinite"
        if idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool or idx.shape != lat.shape[:1]:
            return f"prompt_index must be {lat.shape[0]} integers (one per latent), not {idx.dtype} {list(idx.shape)}"
        if not isinstance(self.prompts, list) or not self.prompts or not all(isinstance(p, str) for p in self.prompts):
            return "prompts must be a non-empty list of strings"
        if int(idx.min()) < 0 or int(idx.max()) >= len(self.prompts):
            return (f"prompt_index must lie in [0, {len(self.prompts)}) (one row per prompt), "
                    f"found {int(idx.min())}..{int(idx.max())}")
        return None

    def __len__(self) -> int:
        return int(self.latents.shape[0])

    @property
    def classes(self) -> list[str]:
        return self.meta.get("classes", self.prompts)

    def save(self, folder: str | os.PathLike) -> Path:
        folder = Path(folder)
        problem = self.problem()  # checked again: tensors can change after the set was made
        if problem:
            raise UserError(f"refusing to write latents to {folder}: {problem}")
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / "latents.safetensors.tmp"
        save_file({"latents": self.latents.contiguous(), "prompt_index": self.prompt_index.contiguous()}, str(tmp))
        meta = {**self.meta, "prompts": self.prompts, "count": len(self), "shape": list(self.latents.shape[1:]),
                "latents_sha256": _sha256(tmp)}
        os.replace(tmp, folder / "latents.safetensors")
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
        try:
            meta = json.loads(j.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UserError(f"{j} is damaged ({exc}); {REBUILD}") from None
        if not isinstance(meta, dict) or not isinstance(meta.get("prompts"), list):
            raise UserError(f"{j} is damaged (no list of prompts); {REBUILD}")
        if expect_vae_hash and meta.get("vae_hash") not in (None, expect_vae_hash):
            raise UserError(f"latents in {folder} were made by VAE {meta.get('vae_hash')}, not {expect_vae_hash}; "
                            "re-run `llcm encode` with this model's VAE")
        data = f.read_bytes()
        if meta.get("latents_sha256") not in (None, hashlib.sha256(data).hexdigest()):
            raise UserError(f"{f} is damaged or was changed after it was written (its sha256 differs from the one in "
                            f"latents.json); {REBUILD}")
        try:
            t = load_bytes(data)
        except Exception as exc:  # safetensors raises its own error type for a cut or overwritten file
            raise UserError(f"{f} is damaged ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
                            f"{REBUILD}") from None
        lat, idx = t.get("latents"), t.get("prompt_index")
        if lat is None or idx is None:
            raise UserError(f"{f} has the wrong layout: expected latents [N,C,h,w] and prompt_index [N]; {REBUILD}")
        recorded = {"count": meta.get("count", lat.shape[0]), "shape": meta.get("shape", list(lat.shape[1:]))}
        if recorded != {"count": lat.shape[0], "shape": list(lat.shape[1:])}:
            raise UserError(f"{f} holds latents {list(lat.shape)} but {j.name} records {recorded['count']} of "
                            f"{recorded['shape']}; {REBUILD}")
        prompts = meta.pop("prompts")
        if len(meta.get("classes", prompts)) != len(prompts):
            raise UserError(f"{j} lists {len(meta['classes'])} classes for {len(prompts)} prompts; {REBUILD}")
        try:
            return cls(lat.float() if lat.is_floating_point() else lat, idx, prompts, meta)
        except UserError as exc:
            raise UserError(f"{f}: {exc}; {REBUILD}") from None

    def check_compatible(self, unet) -> None:
        c, h, w = self.latents.shape[1:]
        if c != unet.config.in_channels:
            raise UserError(f"latents have {c} channels but the UNet expects {unet.config.in_channels}")
        if h % 4 or w % 4:
            raise UserError(f"latent size {h}x{w} is not a multiple of 4")
