#!/usr/bin/env bash
# Adapt the default model to modalities it never saw (LCF, no teacher) and measure it:
#   bash recipes/adapt.sh [RUN_DIR]
# For each modality in MODS (held out of the default model and of its VAE): a 256/80 dataset from
# `llcm data openworld`, its latents, LCF with llcm finetune's defaults at each budget in BUDGETS (one run
# per budget: a curve over steps; --replay 0, learning alone), one modality after the other at two threads
# (the last budget is the default, about 12 min here). Then, at one thread each, two side by side: `llcm evaluate` of the zero-shot
# model and every budget at 1, 2 and 4 steps; for the first modality the defaults (replay 0.25 of the
# base's classes) and an adapter (--lora-rank 8, --replay 0) at the last budget; and forgetting: the 10 original classes before and after (FID,
# classifier). Extra finetune options: LCF_OPTS.
set -euo pipefail
R=${1:-runs/adapt}
MODS=${MODS:-"ultrasound nuclear-medicine"}
BUDGETS=${BUDGETS:-"500 1000 2000"}
LCF_OPTS=${LCF_OPTS:-}
PER_CLASS=${PER_CLASS:-80}
mkdir -p "$R"
[ -d "$R/mini" ] || llcm data mini --out "$R/mini" --quiet
last=${BUDGETS##* }

lcf() {  # one modality: data, latents, one LCF run per budget (two threads: the machine is its own)
  local m=$1 d="$R/$1"
  mkdir -p "$d"
  [ -d "$d/data" ] || llcm data openworld --out "$d/data" --modality "$m" --train-per-modality 256 \
    --test-per-modality 80 --no-augment --quiet
  llcm encode --data "$d/data" --model default --out "$d/lat" --quiet
  for b in $BUDGETS; do  # separate runs: the learning rate's cosine ends at each run's --steps
    [ -d "$d/lcf-$b" ] || { OMP_NUM_THREADS=2 llcm finetune --model default --latents "$d/lat" --out "$d/lcf-run-$b" --resume \
      --steps "$b" --replay 0 --quiet $LCF_OPTS; cp -r "$d/lcf-run-$b/model" "$d/lcf-$b"; }
  done
}

evaluate() {  # zero-shot and every budget on the modality's test split
  local d="$R/$1" models=(--model zero-shot=default)
  for b in $BUDGETS; do models+=(--model "lcf-$b=$d/lcf-$b"); done
  llcm evaluate --data "$d/data" --out "$d/eval" "${models[@]}" --per-class "$PER_CLASS" --steps 1,2,4 \
    --no-memorization --no-classifier --quiet
}

for m in $MODS; do lcf "$m"; done
export OMP_NUM_THREADS=1
first=${MODS%% *}
d="$R/$first"
for m in $MODS; do evaluate "$m" & done
wait
[ -d "$d/replay/model" ] || llcm finetune --model default --latents "$d/lat" --out "$d/replay" --resume --steps "$last" \
  --replay 0.25 --quiet $LCF_OPTS &
[ -d "$d/adapter/model" ] || llcm finetune --model default --latents "$d/lat" --out "$d/adapter" --resume --steps "$last" \
  --lora-rank 8 --replay 0 --quiet $LCF_OPTS &
wait
llcm evaluate --data "$d/data" --out "$d/eval-keep" --model "replay=$d/replay/model" --model "adapter=$d/adapter/model" \
  --per-class "$PER_CLASS" --steps 1,2,4 --no-memorization --no-classifier --quiet &
llcm evaluate --data "$R/mini" --out "$R/forgetting" --model base=default --model "full=$d/lcf-$last" \
  --model "replay=$d/replay/model" --model "adapter=$d/adapter/model" --per-class 20 --steps 4 --no-memorization --quiet &
wait
