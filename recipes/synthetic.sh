#!/usr/bin/env bash
# The README's "Make a synthetic dataset" figures, from the default model and the embedded dataset:
# a synthetic twin of the real train split (300 per class), its utility (train on synthetic, test on real),
# per-class FID and FRD of the model's 4-step images, a DICOM export, and the throughput against diffusers.
#   bash recipes/synthetic.sh [OUT]       about 20 minutes on 2 CPU cores
set -euo pipefail
OUT=${1:-runs/synthetic}
llcm data mini --out "$OUT/mini"
llcm synthesize --model default --per-class 300 --out "$OUT/synth"
llcm synthesize --model default --per-class 20 --format dicom --out "$OUT/synth-dicom"
llcm evaluate --data "$OUT/mini" --model default=default --steps 4 --per-class 100 --utility "$OUT/synth" \
  --out "$OUT/eval"
python bench/synthesize.py | tee "$OUT/throughput.txt"
