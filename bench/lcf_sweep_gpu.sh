#!/usr/bin/env bash
# The LCF settings sweep of docs/adapt.md, as it ran on one H200 (any device works; a CPU takes hours):
#   bash bench/lcf_sweep_gpu.sh short|long LAT_US OUT [LAT_NM]
# LAT_US: `llcm encode --model default` cache of `llcm data openworld --modality ultrasound
# --train-per-modality 256 --test-per-modality 80 --no-augment` (LAT_NM: the same for nuclear-medicine).
# `short`: the settings below at 150-2400 steps, 14 processes at a time, stopped after 330 s (the ones at
# 2400 steps, the LoRA ones and "paper" did not finish there); `long`: five settings trained for a fixed
# 3.5 minutes each (about 1400 steps), 5 at a time. Every option is spelt out: "B" is what llcm finetune's
# defaults were then (lr 1e-3, EMA 0, k 100). Score on a machine with the Inception weights:
#   python bench/lcf_sweep.py score [--grayscale] --data DATA --out OUT/us
set -u
PHASE=$1; LUS=$2; O=$3; LNM=${4:-}
S="$(dirname "$0")/lcf_sweep.py"
B="--lr 1e-3 --ema 0 --k 100"
export PYTHONUNBUFFERED=1
if [ "$PHASE" = short ]; then
  R="route:--steps 300||--steps 300 --w-min 2 --w-max 8"
  R2="route:--steps 300 --lr 1e-3||--steps 300 --w-min 2 --w-max 8 --lr 1e-3 --ema 0"
  R3="route:--steps 1200||--steps 1200 --w-min 2 --w-max 8"
  timeout 330 python3 "$S" run --latents "$LUS" --out "$O/us" --parallel 14 \
    --config d2400="$B --steps 2400" --config kc2400="$B --steps 2400 --k-start 1000" --config "route2400=$R3" \
    --config b8x2400="$B --batch 8 --steps 2400" --config zs=zero-shot --config d600="$B --steps 600" \
    --config kc600="$B --steps 600 --k-start 1000" --config "route600=$R" --config "route600b=$R2" \
    --config kc600r1="$B --steps 600 --k-start 1000 --k-ramp 1" --config d150="$B --steps 150" \
    --config d300="$B --steps 300" --config d1200="$B --steps 1200" \
    --config lr3e-4="$B --steps 600 --lr 3e-4" --config lr3e-3="$B --steps 600 --lr 3e-3" \
    --config k50="$B --steps 600 --k 50" --config k200="$B --steps 600 --k 200" \
    --config k500="$B --steps 600 --k 500" --config l2="$B --steps 600 --loss l2" \
    --config ema9="$B --steps 600 --ema 0.9" --config lora8="$B --steps 600 --lora-rank 8" \
    --config lora32="$B --steps 600 --lora-rank 32" --config lora8lr3e-3="$B --steps 600 --lora-rank 8 --lr 3e-3" \
    --config paper="--steps 600 --lr 5e-5 --ema 0.95 --k 20" --config kc1200="$B --steps 1200 --k-start 1000"
  [ -n "$LNM" ] && timeout 90 python3 "$S" run --latents "$LNM" --out "$O/nm" --parallel 14 \
    --config zs=zero-shot --config d600="$B --steps 600" --config kc600="$B --steps 600 --k-start 1000" \
    --config "route600=$R" --config d2400="$B --steps 2400" --config kc2400="$B --steps 2400 --k-start 1000"
else
  L=3.5; H=1.75
  timeout 300 python3 "$S" run --latents "$LUS" --out "$O/us" --parallel 5 \
    --config dlong="$B --steps 30000 --time-limit $L" \
    --config kclong="$B --steps 8000 --time-limit $L --k-start 1000 --k-ramp 0.25" \
    --config "routelong=route:--steps 30000 --time-limit $H||--steps 30000 --time-limit $H --w-min 2 --w-max 8" \
    --config lora8long="$B --lora-rank 8 --steps 30000 --time-limit $L" \
    --config k200long="$B --k 200 --steps 30000 --time-limit $L"
fi
