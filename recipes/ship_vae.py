"""Put a new VAE into the shipped default model (src/llcm/default_model) without touching its UNet.

For a VAE fine-tuned with `llcm train vae --init default --anchor <the model's training data>` (see
recipes/openworld_vae.sh): its latents of the old data are the old ones, so the shipped student stays
valid and keeps its model hash (the UNet's). The script copies the VAE's weights and config, renders
the reference image again, updates card.json (file hashes, reference, a "vae" entry with the VAE's
report and the bench numbers given) and the card's "VAE" section and file table.

    python recipes/ship_vae.py runs/openworld-vae/vae/model --bench runs/openworld-vae/bench.json \
        --recipe "bash recipes/openworld_vae.sh runs/openworld-vae"
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ship_default import amend_card, render_reference  # noqa: E402


def vae_section(report: dict, bench: dict | None, recipe: str) -> str:
    lines = ["## VAE", "",
             "The VAE was fine-tuned after the student was trained, on an open-world corpus (`llcm data openworld`: "
             "real pixels shipped in scikit-image, nilearn, pydicom and nibabel, photographs and procedural "
             "textures), with the latents of the embedded dataset held where they were (`--anchor`, relative "
             f"latent drift {report.get('anchor_latent_drift_rel')}), so the student above is unchanged and still "
             "valid. Ultrasound, microscopy and nuclear medicine were left out of its training.", "",
             "```", recipe, "```", ""]
    if bench:
        models = bench["models"]
        names = list(models)
        lines += ["Reconstruction of test crops (`python bench/vae_open_world.py`), PSNR dB / SSIM:", "",
                  "| modality | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
        for mod in models[names[0]]:
            mark = " (left out)" if mod in bench.get("held_out", []) else ""
            lines.append(f"| {mod}{mark} | " + " | ".join(
                f"{models[n][mod]['psnr_db']:.2f} / {models[n][mod]['ssim']:.3f}" for n in names) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("vae", type=Path, help="the VAE folder (a `llcm train vae` model/)")
    ap.add_argument("--dest", type=Path, default=Path(__file__).resolve().parents[1] / "src/llcm/default_model")
    ap.add_argument("--bench", type=Path, help="bench/vae_open_world.py --json output to quote")
    ap.add_argument("--recipe", default="bash recipes/openworld_vae.sh runs/openworld-vae")
    args = ap.parse_args(argv)
    dest = args.dest
    report = json.loads((args.vae / "vae_report.json").read_text())
    card = json.loads((dest / "card.json").read_text())
    old_sf = json.loads((dest / "vae" / "config.json").read_text())["scaling_factor"]
    if abs(report["scaling_factor"] - old_sf) > 1e-9:
        raise SystemExit(f"the VAE's scaling factor {report['scaling_factor']} is not the shipped {old_sf}: it was "
                         "not anchored to this model's latents (train it with --init default --anchor DATA)")
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(dest, tmp)
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        shutil.copy2(args.vae / name, tmp / "vae" / name)
    reference = render_reference(tmp)
    if reference["model_hash"] != card["model_hash"]:
        raise SystemExit("the UNet changed: use recipes/ship_default.py for a new model")
    bench = json.loads(args.bench.read_text()) if args.bench else None
    amend_card(tmp, dest, card, "VAE", vae_section(report, bench, args.recipe), reference=reference,
               vae={"report": report, "recipe": args.recipe, "bench": bench})
    print(f"shipped VAE {report.get('vae_hash')} into {dest} (model hash {card['model_hash']} unchanged)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
