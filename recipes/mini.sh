#!/usr/bin/env bash
# The default-model recipe: embedded dataset -> VAE -> teacher -> two students on the same budget
# (paper leapfrog == DDIM, i.e. plain LCM; and the second-order `midpoint` solver) -> evaluation.
# Every stage is an ordinary llcm command, resumable, writing its config beside its output.
#
#   bash recipes/mini.sh [RUN_DIR]            full budget (calibrated for a 2-core CPU)
#   SCALE=0.01 bash recipes/mini.sh /tmp/r    a smoke run of the whole chain in minutes
set -euo pipefail
RUN=${1:-runs/mini}
SCALE=${SCALE:-1}
steps() { python -c "import sys; print(max(2, int(round($1 * $SCALE))))"; }
mkdir -p "$RUN"
llcm data mini --out "$RUN/data"
llcm train vae --data "$RUN/data" --out "$RUN/vae" --steps "$(steps 2000)" --resume
llcm encode --data "$RUN/data" --model "$RUN/vae/model" --out "$RUN/lat-train" --split train
llcm train teacher --latents "$RUN/lat-train" --model "$RUN/vae/model" --out "$RUN/teacher" \
    --steps "$(steps 6000)" --batch 64 --lr 2e-4 --resume
for solver in leapfrog midpoint; do
  llcm distill --teacher "$RUN/teacher/model" --latents "$RUN/lat-train" --solver "$solver" \
      --out "$RUN/llcm-$solver" --steps "$(steps 1500)" --batch 32 --lr 1e-4 --w-min 2 --w-max 8 --resume
done
llcm evaluate --data "$RUN/data" --out "$RUN/eval" --extractor "${EXTRACTOR:-inception}" --per-class "${PER_CLASS:-50}" \
    --steps 1,2,4,8 --model "teacher=$RUN/teacher/model:ddim@50" --model "teacher=$RUN/teacher/model:dpmpp@20" \
    --model "lcm=$RUN/llcm-leapfrog/model" --model "llcm-midpoint=$RUN/llcm-midpoint/model"
echo "recipe done: report in $RUN/eval/report.html"
