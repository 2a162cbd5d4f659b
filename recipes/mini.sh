#!/usr/bin/env bash
# The default-model recipe: embedded dataset -> VAE -> teacher -> two students on the same budget
# (paper leapfrog == DDIM, i.e. plain LCM; and the second-order `midpoint` solver) -> evaluation.
# Every stage is an ordinary llcm command, resumable (rerun the same line after an interruption),
# writing its config beside its output. Uses the GPU when torch sees one.
#
#   bash recipes/mini.sh [RUN_DIR]            full budget (calibrated for a 2-core CPU)
#   SCALE=0.01 bash recipes/mini.sh /tmp/r    a smoke run of the whole chain in minutes
#
# Knobs (environment): SCALE multiplies every step count; VAE_STEPS, TEACHER_STEPS, STUDENT_STEPS
# set them; EXTRACTOR (inception | filterbank), PER_CLASS (images per class and run in the evaluation),
# EVAL_FLAGS (more `llcm evaluate` flags, e.g. --no-memorization). OMP_NUM_THREADS=1 is the robust choice on a
# shared 2-core machine (two threads stall when another process holds a core).
set -euo pipefail
RUN=${1:-runs/mini}
SCALE=${SCALE:-1}
steps() { python -c "import sys; print(max(2, int(round($1 * $SCALE))))"; }
VAE_STEPS=${VAE_STEPS:-$(steps 800)}
TEACHER_STEPS=${TEACHER_STEPS:-$(steps 700)}
STUDENT_STEPS=${STUDENT_STEPS:-$(steps 300)}
mkdir -p "$RUN"
SECONDS=0
stage() { echo "[recipe] $1 done at ${SECONDS}s" | tee -a "$RUN/timing.txt"; }
llcm data mini --out "$RUN/data"; stage data
llcm train vae --data "$RUN/data" --out "$RUN/vae" --steps "$VAE_STEPS" --resume; stage vae
llcm encode --data "$RUN/data" --model "$RUN/vae/model" --out "$RUN/lat-train" --split train; stage encode
llcm train teacher --latents "$RUN/lat-train" --model "$RUN/vae/model" --out "$RUN/teacher" \
    --steps "$TEACHER_STEPS" --batch 64 --lr 3e-4 --resume; stage teacher
for solver in leapfrog midpoint; do
  llcm distill --teacher "$RUN/teacher/model" --latents "$RUN/lat-train" --solver "$solver" \
      --out "$RUN/llcm-$solver" --steps "$STUDENT_STEPS" --batch 32 --lr 2e-4 --w-min 2 --w-max 8 --resume
  stage "distill $solver"
done
llcm evaluate --data "$RUN/data" --out "$RUN/eval" --extractor "${EXTRACTOR:-inception}" --per-class "${PER_CLASS:-20}" ${EVAL_FLAGS:-} \
    --steps 1,2,4 --model "teacher=$RUN/teacher/model:ddim@50" \
    --model "lcm=$RUN/llcm-leapfrog/model" --model "llcm-midpoint=$RUN/llcm-midpoint/model"
stage evaluate
echo "recipe done in ${SECONDS}s: report in $RUN/eval/report.html"
