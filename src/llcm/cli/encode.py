"""`llcm encode`: images -> cached VAE latents, computed once."""

from __future__ import annotations

import argparse

ENCODE_HELP = """\
Encode a split of an imagefolder dataset into VAE latents once, cached in OUT as a LatentSet
(latents-00000.safetensors, ... shards + latents.json) that training reads instead of images. The
latents are the VAE posterior means (deterministic) times the VAE's scaling factor, stored as float16
by default (--dtype), in shards of about 256 MB (--shard-mb) that training reads row by row.

Running it again with the same VAE and data does nothing (after checking every shard's sha256); a
cache made by a different VAE, other data, another split, --flip or --dtype setting is refused unless
--overwrite. An interrupted run keeps its finished shards: run the same command again to go on.

Several processes (one per GPU) share the work and write the same cache as one process:
  torchrun --nproc_per_node 8 -m llcm.cli encode --data ... --model ... --out ...
  (or: accelerate launch -m llcm.cli encode ...)

examples:
  llcm encode --data data/mini --model runs/vae/model --out data/mini-latents
  llcm encode --data data/mini --model path/to/stable-diffusion-v1-5 --out latents-sd15 --split test
"""


def register(sub) -> None:
    e = sub.add_parser("encode", help="images -> cached VAE latents (computed once)", description=ENCODE_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("--data", required=True, help="dataset folder with imagefolder splits (SPLIT/metadata.jsonl)")
    e.add_argument("--model", required=True,
                   help="local model folder with vae/, 'default' (the model shipped with llcm), an adapter folder "
                        "(its base's VAE), a `llcm train vae` run (or its model/), a VAE folder, or a Hugging Face "
                        "id org/name[@revision] already in the local HF cache")
    e.add_argument("--out", required=True, help="latent cache folder to write")
    e.add_argument("--split", default="train", help="split to encode (default train)")
    e.add_argument("--flip", action="store_true",
                   help="also add horizontally flipped copies. Off by default: in medical images left/right is "
                        "anatomy (laterality, situs), so a flipped image shows a different, often impossible, body")
    e.add_argument("--overwrite", action="store_true",
                   help="replace a cache made by another VAE, data or setting, or a damaged one")
    e.add_argument("--batch", type=int, default=16, help="images per encoder batch (default 16)")
    e.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp16",
                   help="how the latents are stored (default fp16: half the disk and reads of fp32, rounding "
                        "errors ~5e-4 relative, far below the VAE's own); training reads them as float32")
    e.add_argument("--shard-mb", type=float, default=None, metavar="MB",
                   help="shard size in MB (default 256, llcm.latents.SHARD_MB)")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=run_encode)


def run_encode(args: argparse.Namespace) -> int:
    from llcm.encode import encode_split

    latents, info = encode_split(args.data, args.model, args.out, split=args.split, flip=args.flip,
                                 overwrite=args.overwrite, batch_size=args.batch, progress=not args.quiet,
                                 dtype=args.dtype, shard_mb=args.shard_mb)
    if not info["main"]:  # the other processes of a multi-process run: the main one reports
        return 0
    if info["skipped"]:
        print(f"{args.out} is up to date (VAE {info['vae_hash']}, data {info['data_hash']}, split {args.split}, "
              f"flip {args.flip}, {info['dtype']}; every shard checked): nothing to do")
        return 0
    shape = "x".join(str(s) for s in latents.latents.shape[1:])
    kept = info["shards"] - info["written"] if info["processes"] == 1 else 0
    print(f"encoded {len(latents)} latents ({shape}{', with flips' if args.flip else ''}) of split {args.split} "
          f"in {info['seconds']:.1f} s -> {args.out} ({info['shards']} {info['dtype']} shards"
          f"{f', {kept} kept from an interrupted run' if kept else ''}): std {info['std']:.3f}, mean "
          f"{info['mean']:.3f} after scaling by {info['scaling_factor']:.5g}; {len(latents.prompts)} prompts; "
          f"VAE {info['vae_hash']}")
    return 0
