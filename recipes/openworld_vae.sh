#!/usr/bin/env bash
# The default model's open-world VAE: the shipped VAE fine-tuned on `llcm data openworld` (every offline
# modality but ultrasound, microscopy and nuclear medicine, which stay unseen) while the latents of the
# embedded dataset are held where they were (--anchor), so the shipped teacher and students stay valid.
#   bash recipes/openworld_vae.sh [RUN_DIR]      (2015 steps: about 20 min on an idle 2-core machine at one thread)
# then score it: python bench/vae_open_world.py --model new=RUN_DIR/vae/model --model shipped=default --data RUN_DIR/mini
set -euo pipefail
R=${1:-runs/openworld-vae}
STEPS=${STEPS:-2015}
mkdir -p "$R"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
[ -d "$R/mini" ] || llcm data mini --out "$R/mini" --quiet
[ -d "$R/corpus" ] || llcm data openworld --out "$R/corpus" --quiet
# the VAE the shipped student was trained with (the default model's VAE before this recipe replaced it)
if [ -z "${INIT:-}" ]; then
  INIT="$R/student-vae"; mkdir -p "$INIT"
  for f in config.json diffusion_pytorch_model.safetensors; do
    git show "5dce4d2:src/llcm/default_model/vae/$f" > "$INIT/$f"
  done
fi
RESUME=(); [ -d "$R/vae/checkpoints" ] && RESUME=(--resume)
llcm train vae --data "$R/corpus" --init "$INIT" --anchor "$R/mini" --anchor-weight 10 --anchor-model default \
  --anchor-samples 100 --out "$R/vae" \
  --steps "$STEPS" --batch 32 --lr 2e-4 --checkpoint-every 500 --quiet "${RESUME[@]}"
