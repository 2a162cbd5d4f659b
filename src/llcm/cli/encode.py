"""`llcm encode`: images -> cached VAE latents, computed once."""

from __future__ import annotations

import argparse

ENCODE_HELP = """\
Encode a split of an imagefolder dataset into VAE latents once, cached in OUT as a LatentSet
(latents.safetensors + latents.json) that training reads instead of images. The latents are the
VAE posterior means (deterministic) times the VAE's scaling factor.

Running it again with the same VAE and data does nothing; a cache made by a different VAE, other
data, another split or --flip setting is refused unless --overwrite.

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
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=run_encode)


def run_encode(args: argparse.Namespace) -> int:
    from llcm.encode import encode_split

    latents, info = encode_split(args.data, args.model, args.out, split=args.split, flip=args.flip,
                                 overwrite=args.overwrite, batch_size=args.batch, progress=not args.quiet)
    if info["skipped"]:
        print(f"{args.out} is up to date (VAE {info['vae_hash']}, data {info['data_hash']}, split {args.split}, "
              f"flip {args.flip}): nothing to do")
        return 0
    shape = "x".join(str(s) for s in latents.latents.shape[1:])
    print(f"encoded {len(latents)} latents ({shape}{', with flips' if args.flip else ''}) of split {args.split} "
          f"in {info['seconds']:.1f} s -> {args.out}: std {info['std']:.3f}, mean {info['mean']:.3f} after "
          f"scaling by {info['scaling_factor']:.5g}; {len(latents.prompts)} prompts; VAE {info['vae_hash']}")
    return 0
