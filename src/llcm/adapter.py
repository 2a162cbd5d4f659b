"""LoRA adapters that keep their base: add, merge, save as a small folder, load onto the base again.

An adapter folder holds ``adapter.safetensors`` (peft's LoRA state dict, plus any tensor trained in
full, such as the w-embedding) and an ``llcm.json`` that names its base model ("default", or its folder
relative to the adapter folder, so the two can be moved together) and the base UNet's hash. Fine-tuning
writes one instead of a full UNet, so one base can carry several adapters and its files are never rewritten.
:func:`load_adapted` (and so ``load_components`` on an adapter folder) loads the base, refuses it if its hash
differs from the recorded one, and merges the adapter into that in-memory copy. A base may itself be an
adapter folder: adapters chain.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from llcm.errors import UserError
from llcm.fileio import follow_link, link_to
from llcm.model_folder import read_meta

ADAPTER_FILE = "adapter.safetensors"
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                "conv1", "conv2", "time_emb_proj"]


def _lora_config(rank: int, alpha: float, targets: list[str]):
    try:
        from peft import LoraConfig
    except ImportError:  # pragma: no cover
        raise UserError("LoRA needs peft: pip install 'llcm[lora]'") from None
    return LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets)


def _targeted(unet: nn.Module, targets: list[str]) -> list[nn.Module]:
    """The layers peft adapts for `targets` (a module name equal to a target or ending in ".target")."""
    return [m for n, m in unet.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d)) and any(n == t or n.endswith("." + t) for t in targets)]


def add_lora(unet: nn.Module, rank: int, seed: int = 0) -> nn.Module:
    """Freeze the UNet and add LoRA adapters (peft) on attention, feed-forward and conv layers.

    The rank must be at least 1 and at most the smallest dimension of the adapted layers: a larger
    rank adds parameters without adding capacity and only hides a typo. The random init of the LoRA
    down-projections is drawn from `seed`, not from the global RNG, so a run does not depend on what
    ran before it in the process.
    """
    names = {n.rsplit(".", 1)[-1] for n, _ in unet.named_modules()}
    targets = [t for t in LORA_TARGETS if t.split(".")[-1] in names or t in names]
    # a layer's update is out x (in * kernel area): its rank is at most the smaller of the two
    limit = min((min(m.weight.shape[0], m.weight[0].numel()) for m in _targeted(unet, targets)), default=0)
    if not 1 <= rank <= limit:
        raise UserError(f"LoRA rank {rank} does not fit this UNet: use 1 to {limit} (the smallest dimension "
                        "of the layers it adapts)")
    config = _lora_config(rank, rank, targets)
    unet.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet.add_adapter(config)
    return unet


def merged_unet(unet: nn.Module) -> nn.Module:
    """A plain UNet (no adapters) whose weights include any LoRA update; the input is left unchanged."""
    if not getattr(unet, "_hf_peft_config_loaded", False):
        return unet
    from peft.tuners.tuners_utils import BaseTunerLayer

    work = copy.deepcopy(unet)
    for m in work.modules():
        if isinstance(m, BaseTunerLayer):
            m.merge()
    state = {}
    for k, v in work.state_dict().items():
        if "lora_" in k:
            continue
        state[k.replace(".base_layer.", ".")] = v
    plain = type(unet).from_config(unet.config)
    plain.load_state_dict(state)
    return plain


def is_adapter(folder: str | os.PathLike) -> bool:
    return (Path(folder).expanduser() / ADAPTER_FILE).is_file()


def adapter_record(folder: str | os.PathLike) -> dict:
    """The "adapter" entry of an adapter folder's llcm.json (base, base_hash, rank, alpha, target_modules), with
    "base" as a --model argument: "default", a Hugging Face id pinned to a commit (org/name@commit), or the base
    folder's absolute path on this machine (llcm.json records it relative to the adapter folder; older
    adapters: absolute)."""
    from llcm.hub import split_hub_id
    from llcm.pipeline import DEFAULT_MODEL

    folder = Path(folder).expanduser()
    if not is_adapter(folder):
        raise UserError(f"{folder} is not an adapter folder (no {ADAPTER_FILE}); pass a full model with --model")
    record = read_meta(folder).get("adapter")
    if not record or not record.get("base") or not record.get("base_hash"):
        raise UserError(f"{folder} has {ADAPTER_FILE} but its llcm.json does not name the base model")
    local = follow_link(record["base"], folder)
    if record["base"] != DEFAULT_MODEL and (split_hub_id(record["base"]) is None or local.exists()):
        record = {**record, "base": str(local)}
    return record


def base_spec(given: str | os.PathLike) -> str:
    """The base of an adapter about to be trained: "default" as is, a Hugging Face id pinned to its cached commit
    (org/name@commit), any other folder as an absolute path (:func:`save_adapter` records it relative to the
    adapter folder)."""
    from llcm.pipeline import DEFAULT_MODEL, hub_snapshot

    if str(given) == DEFAULT_MODEL:
        return DEFAULT_MODEL
    snapshot = hub_snapshot(given)
    return str(Path(given).expanduser().resolve()) if snapshot is None else snapshot.record


def base_folder(folder: str | os.PathLike) -> Path:
    """The base folder an adapter records (it must still be there)."""
    from llcm.pipeline import resolve_model

    base = resolve_model(adapter_record(folder)["base"])
    if not base.is_dir():
        raise UserError(f"adapter {folder} was trained on {base}, which no longer exists; pass the base "
                        "with --model and the adapter with --adapter")
    return base


def full_model_folder(folder: str | os.PathLike) -> Path:
    """The full model under a chain of adapters: the folder that holds the VAE and the text encoder."""
    folder = Path(folder).expanduser()
    while is_adapter(folder):
        folder = base_folder(folder)
    return folder


def save_adapter(unet: nn.Module, folder: str | os.PathLike, config: dict, base: str, base_hash: str,
                 scheduler_config: dict) -> Path:
    """Write an adapter folder atomically: LoRA + fully trained tensors, llcm.json, scheduler config.

    ``config`` is the model's llcm.json content (classes, k, w range, latent_mean, ...); ``unet_hash`` is
    the merged UNet's, the hash the loaded model and its images report. ``base`` ("default", a Hugging Face id
    or a folder) is recorded as "default", as the id, or relative to `folder`, so the two can be moved together.
    """
    from peft.utils import get_peft_model_state_dict

    from llcm import __version__
    from llcm.fileio import atomic_folder
    from llcm.hub import split_hub_id
    from llcm.models import model_hash
    from llcm.pipeline import DEFAULT_MODEL

    peft_config = unet.peft_config["default"]
    tensors = dict(get_peft_model_state_dict(unet))
    full = {n.replace(".base_layer.", "."): p for n, p in unet.named_parameters()
            if p.requires_grad and "lora_" not in n}  # e.g. the w-embedding, trained in full
    tensors.update(full)
    recorded_base = base if str(base) == DEFAULT_MODEL or split_hub_id(base) else link_to(base, folder)
    record = {"base": recorded_base, "base_hash": base_hash, "rank": int(peft_config.r),
              "alpha": peft_config.lora_alpha, "target_modules": sorted(peft_config.target_modules),
              "trained_in_full": sorted(full),
              "weights": f"{ADAPTER_FILE}: peft LoRA state dict (get_peft_model_state_dict) + tensors trained in full"}
    with atomic_folder(folder) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / ADAPTER_FILE),
                  metadata={"format": "pt"})
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config, indent=2))
        merged = merged_unet(copy.deepcopy(unet).cpu())  # merged on the CPU, as load_adapted merges it
        meta = {**config, "llcm_version": __version__, "unet_hash": model_hash(merged), "adapter": record}
        (tmp / "llcm.json").write_text(json.dumps(meta, indent=2))
    return Path(folder)


def load_adapted(folder: str | os.PathLike, base: str | os.PathLike | None = None,
                 dtype: torch.dtype | None = None):
    """Components of `base` (default: the recorded base) with the adapter in `folder` merged into a copy.

    The base's files are only read. A base whose UNet hash differs from the recorded one is refused.
    """
    from llcm.models import load_components, model_hash
    from llcm.pipeline import resolve_model

    folder = Path(folder).expanduser()
    record = adapter_record(folder)
    base_path = base_folder(folder) if base is None else resolve_model(base)
    comps = load_components(base_path)
    have = model_hash(comps.unet)
    if have != record["base_hash"]:
        raise UserError(f"adapter {folder} was trained on base {record['base_hash']}, this base ({base_path}) "
                        f"is {have}")
    tensors = load_file(str(folder / ADAPTER_FILE))
    lora = {k: v for k, v in tensors.items() if "lora_" in k}
    full = {k: v for k, v in tensors.items() if "lora_" not in k}
    unet = comps.unet
    with torch.random.fork_rng(devices=[]):  # the init is overwritten: leave the caller's RNG alone
        unet.add_adapter(_lora_config(record["rank"], record["alpha"], list(record["target_modules"])))
    from peft.utils import set_peft_model_state_dict

    result = set_peft_model_state_dict(unet, lora)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing:
        raise UserError(f"adapter {folder} does not fit the base {base_path}: "
                        f"{len(result.unexpected_keys)} unexpected and {len(missing)} missing LoRA tensors")
    plain = merged_unet(unet)
    extra = plain.load_state_dict(full, strict=False).unexpected_keys
    if extra:
        raise UserError(f"adapter {folder} has tensors the base UNet lacks, e.g. {extra[0]}")
    plain.eval()
    if dtype is not None:
        plain.to(dtype=dtype)
        for m in (comps.vae, comps.text_encoder):
            m.to(dtype=dtype)
    return dataclasses.replace(comps, unet=plain)
