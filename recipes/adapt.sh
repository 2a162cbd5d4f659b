#!/usr/bin/env bash
# Adapt the default model to modalities it never saw (LCF, no teacher) and measure it:
#   bash recipes/adapt.sh [RUN_DIR]
# For each modality in MODS (held out of the default model and of its VAE): a 256/80 dataset from
# `llcm data openworld`, its latents, LCF at the budgets in BUDGETS (one run, resumed: a curve over
# steps), and `llcm evaluate` of the zero-shot model and every budget at 1, 2 and 4 steps. For the first
# modality also replay (--replay) and an adapter (--lora-rank) at the last budget, and forgetting: the
# 10 original classes before and after (FID, classifier). Stages at one thread; two modalities side by
# side on a 2-core machine. Extra finetune options: LCF_OPTS (default: llcm finetune's own defaults).
set -euo pipefail
R=${1:-runs/adapt}
MODS=${MODS:-"ultrasound nuclear-medicine"}
BUDGETS=${BUDGETS:-"150 300 600"}
LCF_OPTS=${LCF_OPTS:-}
PER_CLASS=${PER_CLASS:-80}
export OMP_NUM_THREADS=1
mkdir -p "$R"
[ -d "$R/mini" ] || llcm data mini --out "$R/mini" --quiet
last=${BUDGETS##* }

adapt() {  # one modality: data, latents, LCF curve, evaluation
  local m=$1 d="$R/$1"
  mkdir -p "$d"
  [ -d "$d/data" ] || llcm data openworld --out "$d/data" --modality "$m" --train-per-modality 256 \
    --test-per-modality 80 --no-augment --quiet
  llcm encode --data "$d/data" --model default --out "$d/lat" --quiet
  local models=(--model zero-shot=default) resume=()
  for b in $BUDGETS; do
    [ -d "$d/lcf-$b" ] || { llcm finetune --model default --latents "$d/lat" --out "$d/lcf" --steps "$b" \
      --checkpoint-every "$b" --quiet "${resume[@]}" $LCF_OPTS; cp -r "$d/lcf/model" "$d/lcf-$b"; }
    resume=(--resume)
    models+=(--model "lcf-$b=$d/lcf-$b")
  done
  llcm evaluate --data "$d/data" --out "$d/eval" "${models[@]}" --per-class "$PER_CLASS" --steps 1,2,4 \
    --no-memorization --no-classifier --quiet
}

first=${MODS%% *}
for m in $MODS; do adapt "$m" & done
wait
d="$R/$first"
[ -d "$d/replay/model" ] || llcm finetune --model default --latents "$d/lat" --out "$d/replay" --steps "$last" \
  --replay 0.25 --quiet $LCF_OPTS &
[ -d "$d/adapter/model" ] || llcm finetune --model default --latents "$d/lat" --out "$d/adapter" --steps "$last" \
  --lora-rank 8 --quiet $LCF_OPTS &
wait
llcm evaluate --data "$d/data" --out "$d/eval-keep" --model "replay=$d/replay/model" --model "adapter=$d/adapter/model" \
  --per-class "$PER_CLASS" --steps 1,2,4 --no-memorization --no-classifier --quiet
llcm evaluate --data "$R/mini" --out "$R/forgetting" --model base=default --model "full=$d/lcf-$last" \
  --model "replay=$d/replay/model" --model "adapter=$d/adapter/model" --per-class 20 --steps 4 --no-memorization --quiet
