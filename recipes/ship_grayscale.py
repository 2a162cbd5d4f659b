"""Record which classes of the shipped default model are grayscale (llcm.json "grayscale"), so that its
samples of those classes are returned as their luminance (llcm.images), and re-render its reference image.

A model distilled or fine-tuned by llcm gets that list from its latent cache (`llcm encode` measures it);
the default model was shipped before, so this script measures it on the model's training split:

    llcm data mini --out runs/mini-data && python recipes/ship_grayscale.py runs/mini-data
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ship_default import amend_card, render_reference  # noqa: E402


def measure(data: Path, split: str = "train") -> list[str]:
    from llcm.images import channel_spread, grayscale_classes
    from llcm.vae import load_pixels, scan_split

    images = scan_split(data, split, 8)
    spreads = np.concatenate([channel_spread(load_pixels(images, range(i, min(i + 256, len(images)))).numpy())
                              for i in range(0, len(images), 256)])
    return grayscale_classes(spreads, list(images.texts))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", type=Path, help="the model's training dataset (llcm data mini)")
    ap.add_argument("--dest", type=Path, default=Path(__file__).resolve().parents[1] / "src/llcm/default_model")
    args = ap.parse_args(argv)
    dest = args.dest
    cfg = json.loads((dest / "llcm.json").read_text())
    gray = [p for p in measure(args.data) if p in cfg["classes"]]
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(dest, tmp)
    cfg["grayscale"] = gray
    (tmp / "llcm.json").write_text(json.dumps(cfg, indent=2) + "\n")
    card = json.loads((tmp / "card.json").read_text())
    reference = render_reference(tmp)
    if reference["model_hash"] != card["model_hash"]:
        raise SystemExit("the model's weights changed: use recipes/ship_default.py")
    note = ("## Grayscale classes\n\nThe images of these classes are grayscale, so their samples are returned as "
            "their luminance (`llcm generate --keep-colour` keeps the RGB samples): "
            + "; ".join(f"\"{p}\"" for p in gray) + ". Measured by `python recipes/ship_grayscale.py DATA` on the "
            "train split of `llcm data mini`.\n")
    amend_card(tmp, dest, card, "Grayscale classes", note, reference=reference,
               grayscale={"classes": gray, "measured_on": "llcm data mini, train split",
                          "recipe": "python recipes/ship_grayscale.py DATA"})
    print(f"grayscale classes of {dest}: {gray}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
