"""Model components: load a LOCAL diffusers-format Stable Diffusion folder, or build a tiny preset.

What lives here, and why it looks the way it does:

* :class:`Components` is the four pieces of a Stable-Diffusion-style latent diffusion model
  (UNet, VAE, text encoder, tokenizer) plus the two numbers the rest of llcm needs from them:
  the teacher's ``prediction_type`` ("epsilon" or "v_prediction") and the VAE latent
  ``scaling_factor``. The scheduler is deliberately *not* a component: the discrete SD schedule is
  plain math in :mod:`llcm.schedules`, so only the prediction type is read from a folder's
  ``scheduler/scheduler_config.json``.
* Presets are small JSON files shipped in ``llcm/configs/`` (:mod:`llcm.presets`:
  :func:`list_presets`, :func:`load_preset`). ``tiny-cpu`` holds diffusers/transformers configs from which
  :func:`build_tiny_components` builds random-weight models that run in milliseconds on a CPU
  (64x64 pixels -> 4x16x16 latents: the VAE has 3 resolution levels, i.e. factor 4).
  ``sd15`` and ``sd21-base`` describe real checkpoints (resolution, prediction type and the
  paper's distillation hyper-parameters) and are loaded with :func:`load_components` from a
  folder the user already has. Its UNet attends to text at all three levels (diffusers'
  ``attention_head_dim`` is, for legacy reasons, the number of heads: 4).
  The tiny VAE's ``scaling_factor`` is 1.0 because random weights have no meaningful latent
  statistics; a VAE trained by ``llcm train vae`` (:mod:`llcm.vae`) records its own.
* **Nothing here downloads.** Every ``from_pretrained`` call gets a local path and
  ``local_files_only=True``, and a path that does not exist is refused *before* any library sees
  it, so a hub id such as ``runwayml/stable-diffusion-v1-5`` raises :class:`~llcm.errors.UserError`
  without touching the network.
* The tokenizer is OpenAI CLIP's BPE, built offline from the vocabulary bundled in
  ``llcm/assets`` (:func:`build_clip_tokenizer`), so the tiny preset tokenizes exactly as SD 1.x
  does (SD 2.x folders ship their own tokenizer, which :func:`load_components` uses).
* :func:`encode_prompts` reproduces the ``prompt_embeds`` of diffusers' StableDiffusion and
  LatentConsistencyModel pipelines (max-length padding, truncation, last hidden state), so images
  sampled by llcm and by those pipelines from the same weights agree; ``""`` is the null prompt.
* :func:`add_guidance_embedding` turns a teacher UNet into an LCM student with a w-embedding input
  (``time_cond_proj_dim``), like diffusers' LCM distillation script, except that the new
  projection starts at zero, so the student initially *equals* the teacher for every w.
* :func:`model_hash` stamps generated images with a short digest of the UNet weights.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from llcm.errors import UserError
from llcm.presets import list_presets, load_preset  # noqa: F401  (re-exported)

__all__ = [
    "Components",
    "add_guidance_embedding",
    "build_clip_tokenizer",
    "build_tiny_components",
    "components_from_preset",
    "encode_prompts",
    "list_presets",
    "load_components",
    "load_preset",
    "model_hash",
]

PREDICTION_TYPES = ("epsilon", "v_prediction")
CLIP_MAX_LENGTH = 77
_BPE_ASSET = "bpe_simple_vocab_16e6.txt.gz"
_CLIP_VOCAB_SIZE = 49408
_NO_DOWNLOAD = "llcm never downloads weights: pass a local diffusers-format folder"


@dataclass(frozen=True, eq=False)
class Components:
    """The pieces of a Stable-Diffusion-style latent diffusion model."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    prediction_type: str
    scaling_factor: float

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise UserError(
                f"unsupported prediction_type {self.prediction_type!r}; expected one of {PREDICTION_TYPES}"
            )

    def to(self, device=None, dtype=None) -> "Components":
        """Move (and optionally cast) the three networks in place; returns self."""
        for m in (self.unet, self.vae, self.text_encoder):
            m.to(device=device, dtype=dtype)
        return self

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along one side (8 for SD, 4 for tiny-cpu)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def resolution(self) -> int:
        """Default image side in pixels, as diffusers computes it (unet sample_size x VAE factor)."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor


# ----------------------------------------------------------------------------------------------
# Tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte -> printable-unicode table (256 symbols)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    byte_values, code_points, extra = printable[:], printable[:], 0
    for b in range(256):
        if b not in printable:
            byte_values.append(b)
            code_points.append(256 + extra)
            extra += 1
    return dict(zip(byte_values, map(chr, code_points)))


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "llcm"


def _write_clip_vocab(folder: Path, bpe_gz: bytes) -> None:
    """vocab.json + merges.txt exactly as OpenAI CLIP's SimpleTokenizer builds its vocabulary."""
    lines = gzip.decompress(bpe_gz).decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]  # line 0 is a header; 48,894 merges
    alphabet = list(_bytes_to_unicode().values())
    vocab = alphabet + [a + "</w>" for a in alphabet]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == _CLIP_VOCAB_SIZE, len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(
        json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False), encoding="utf-8"
    )
    # transformers' merges.txt convention: a "#version" header line, then one merge per line.
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def _clip_vocab_folder(cache_dir: Path | None) -> Path:
    bpe_gz = (resources.files("llcm") / "assets" / _BPE_ASSET).read_bytes()
    name = "clip-bpe-" + hashlib.sha256(bpe_gz).hexdigest()[:12]
    roots = [Path(cache_dir)] if cache_dir is not None else [
        _default_cache_dir(),
        Path(tempfile.gettempdir()) / f"llcm-{os.getuid() if hasattr(os, 'getuid') else 'user'}",
    ]
    for root in roots:
        target = root / name
        if (target / "vocab.json").is_file() and (target / "merges.txt").is_file():
            return target
        try:
            root.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=name + ".", dir=root))
            _write_clip_vocab(staging, bpe_gz)
            try:
                os.replace(staging, target)  # atomic; another process may have won the race
            except OSError:
                for f in staging.iterdir():
                    f.unlink()
                staging.rmdir()
            if (target / "vocab.json").is_file():
                return target
        except OSError:
            continue
    raise UserError(f"cannot write the CLIP tokenizer files to any of: {', '.join(map(str, roots))}")


def build_clip_tokenizer(cache_dir: str | os.PathLike | None = None) -> CLIPTokenizer:
    """OpenAI CLIP's tokenizer (49,408 tokens, 77 positions), built offline from the bundled BPE file.

    The vocabulary files are written once to ``cache_dir`` (default ``~/.cache/llcm``, else a temp
    dir). Padding uses ``<|endoftext|>`` as Stable Diffusion 1.x does.
    """
    folder = _clip_vocab_folder(Path(cache_dir) if cache_dir is not None else None)
    return CLIPTokenizer.from_pretrained(
        str(folder),
        model_max_length=CLIP_MAX_LENGTH,
        pad_token="<|endoftext|>",
        local_files_only=True,
    )


# ----------------------------------------------------------------------------------------------
# Building and loading components


def build_tiny_components(preset: dict, seed: int = 0) -> Components:
    """Random-weight components from a preset's configs; the same seed gives the same weights.

    Each model is seeded separately (seed, seed+1, seed+2), so changing one model's config does not
    change the others' weights; the global torch RNG is left untouched.
    """
    for key in ("unet", "vae", "text_encoder"):
        if key not in preset:
            raise UserError(f"preset {preset.get('name', '?')!r} has no {key!r} config to build from")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(preset["unet"])
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL.from_config(preset["vae"])
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(CLIPTextConfig(**preset["text_encoder"]))
    tokenizer = build_clip_tokenizer()
    max_length = preset.get("tokenizer", {}).get("model_max_length", CLIP_MAX_LENGTH)
    tokenizer.model_max_length = max_length
    if text_encoder.config.max_position_embeddings < max_length:
        raise UserError("text_encoder.max_position_embeddings is shorter than the tokenizer's max length")
    if unet.config.cross_attention_dim != text_encoder.config.hidden_size:
        raise UserError("unet.cross_attention_dim must equal text_encoder.hidden_size")
    return Components(
        unet=unet.eval(),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        prediction_type=preset.get("prediction_type", "epsilon"),
        scaling_factor=float(vae.config.scaling_factor),
    )


def _local_folder(path: str | os.PathLike) -> Path:
    folder = Path(path).expanduser()
    if not folder.exists():
        raise UserError(f"model folder not found: {str(path)!r}; {_NO_DOWNLOAD}")
    if not folder.is_dir():
        raise UserError(
            f"{str(path)!r} is a file; {_NO_DOWNLOAD} (convert single-file checkpoints with diffusers first)"
        )
    return folder


def load_components(
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    variant: str | None = None,
) -> Components:
    """Load UNet, VAE, CLIP text encoder and tokenizer from a LOCAL diffusers-format folder.

    The folder is what ``StableDiffusionPipeline.save_pretrained`` writes (``unet/``, ``vae/``,
    ``text_encoder/``, ``tokenizer/``, optionally ``scheduler/`` and ``model_index.json``).
    ``prediction_type`` comes from ``scheduler/scheduler_config.json`` (default "epsilon"),
    ``scaling_factor`` from the VAE config. ``variant`` selects e.g. ``*.fp16.safetensors`` files;
    ``dtype`` (e.g. ``torch.float16`` on a GPU) is the dtype of all three models.
    An adapter folder (:mod:`llcm.adapter`) gives its base's components with the adapter merged in.
    """
    folder = _local_folder(path)
    from llcm.adapter import is_adapter, load_adapted
    from llcm.model_folder import check_files, read_json

    check_files(folder)
    if is_adapter(folder):
        return load_adapted(folder, dtype=dtype)
    missing = [s for s in ("unet", "vae", "text_encoder", "tokenizer") if not (folder / s).is_dir()]
    if missing:
        listed = ", ".join(m + "/" for m in missing)
        raise UserError(f"{str(folder)!r} is not a diffusers SD folder (missing {listed}); {_NO_DOWNLOAD}")
    index_file = folder / "model_index.json"
    if index_file.is_file() and "text_encoder_2" in read_json(index_file):
        raise UserError(f"{str(folder)!r} has two text encoders (SDXL?); llcm supports SD 1.x/2.x folders")
    prediction_type = "epsilon"
    scheduler_config = folder / "scheduler" / "scheduler_config.json"
    if scheduler_config.is_file():
        prediction_type = read_json(scheduler_config).get("prediction_type", "epsilon")

    diffusers_kwargs: dict[str, Any] = {"variant": variant, "local_files_only": True}
    if dtype is not None:
        diffusers_kwargs["torch_dtype"] = dtype
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", **diffusers_kwargs)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", **diffusers_kwargs)
    text_encoder = CLIPTextModel.from_pretrained(
        folder / "text_encoder", variant=variant, local_files_only=True
    )
    if dtype is not None:
        text_encoder = text_encoder.to(dtype=dtype)
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
    return Components(
        unet=unet.eval(),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        prediction_type=prediction_type,
        scaling_factor=float(vae.config.scaling_factor),
    )


def components_from_preset(preset: dict, base: str | os.PathLike | None = None, seed: int = 0) -> Components:
    """Tiny presets are built from their configs; folder presets load ``base`` (a local folder)."""
    if preset.get("source") == "configs":
        return build_tiny_components(preset, seed=seed)
    if base is None:
        raise UserError(f"preset {preset.get('name', '?')!r} needs a base model: {_NO_DOWNLOAD}")
    return load_components(base)


# ----------------------------------------------------------------------------------------------
# Text conditioning


def tokenize_prompts(components: Components, prompts: list[str]):
    """Token ids (and mask) padded to the tokenizer's max length, as diffusers' SD/LCM pipelines pad them."""
    tok = components.tokenizer
    return tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt")


@torch.no_grad()
def encode_prompts(components: Components, prompts: list[str]) -> torch.Tensor:
    """Text embeddings [B, 77, hidden], computed exactly as diffusers' SD/LCM pipelines' ``prompt_embeds``.

    ``""`` gives the unconditional (null) embedding used by classifier-free guidance. No graph is kept:
    a teacher run that trains the text encoder (``llcm train teacher --train-text-encoder``) encodes
    its prompts inside its network (:class:`llcm.losses.DenoiserNet`), not here.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    text_encoder = components.text_encoder
    tokens = tokenize_prompts(components, prompts)
    attention_mask = None
    if getattr(text_encoder.config, "use_attention_mask", False):
        attention_mask = tokens.attention_mask.to(text_encoder.device)
    embeddings = text_encoder(tokens.input_ids.to(text_encoder.device), attention_mask=attention_mask)[0]
    return embeddings.to(dtype=text_encoder.dtype)


# ----------------------------------------------------------------------------------------------
# Student UNet


def add_guidance_embedding(unet: UNet2DConditionModel, dim: int = 256) -> UNet2DConditionModel:
    """A student UNet that also takes a w-embedding (``timestep_cond``, size ``dim``).

    Same config as the teacher plus ``time_cond_proj_dim=dim``; the teacher's weights are copied
    and the new ``time_embedding.cond_proj`` (a bias-free Linear) starts at zero, so the student's
    output equals the teacher's for every w at initialisation. The teacher is not modified.
    """
    if unet.config.time_cond_proj_dim is not None:
        raise ValueError(
            f"this UNet already has a w-embedding (time_cond_proj_dim={unet.config.time_cond_proj_dim})"
        )
    student = UNet2DConditionModel.from_config(unet.config, time_cond_proj_dim=dim)
    result = student.load_state_dict(unet.state_dict(), strict=False)
    new_keys = {"time_embedding.cond_proj.weight"}
    if set(result.missing_keys) != new_keys or result.unexpected_keys:
        raise RuntimeError(f"unexpected state-dict mismatch: {result}")
    with torch.no_grad():
        student.time_embedding.cond_proj.weight.zero_()
    if (unet.device, unet.dtype) != (student.device, student.dtype):
        student.to(device=unet.device, dtype=unet.dtype)
    return student.train(unet.training)


# ----------------------------------------------------------------------------------------------
# Provenance


def _state_dict_digest(state: dict[str, torch.Tensor]) -> Any:
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest


def model_hash(source: Components | torch.nn.Module | str | os.PathLike, length: int = 12) -> str:
    """Short hex digest of a UNet's weights: sha256 over sorted (name, dtype, shape, bytes).

    ``source`` is a :class:`Components`, a UNet module, or a local folder (a pipeline folder with
    ``unet/`` or a UNet folder itself). A folder is hashed as loaded by diffusers, so it agrees with
    ``model_hash(load_components(folder))``.
    """
    if isinstance(source, Components):
        module = source.unet
    elif isinstance(source, torch.nn.Module):
        module = source
    else:
        folder = _local_folder(source)
        subfolder = "unet" if (folder / "unet").is_dir() else None
        module = UNet2DConditionModel.from_pretrained(folder, subfolder=subfolder, local_files_only=True)
    return _state_dict_digest(module.state_dict()).hexdigest()[:length]
