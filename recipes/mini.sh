#!/usr/bin/env bash
# The default-model recipe: embedded dataset -> VAE -> teacher -> two students on the same budget
# (paper leapfrog == DDIM, i.e. plain LCM; and the second-order `midpoint` solver) -> evaluation.
# Every stage is an ordinary llcm command, resumable (rerun the same line after an interruption),
# writing its config beside its output. Uses the GPU when torch sees one.
#
#   bash recipes/mini.sh [RUN_DIR]                  CPU budget (about 76 min on 2 cores)
#   PROFILE=gpu bash recipes/mini.sh [RUN_DIR]      the shipped default's budget (about 8 min of training
#                                                   on one H100; about 13x the CPU budget's images)
#   SCALE=0.01 bash recipes/mini.sh /tmp/r          a smoke run of the whole chain in minutes
#
# Knobs (environment): PROFILE (cpu | gpu) picks the budgets below; SCALE multiplies every step count;
# VAE_STEPS, TEACHER_STEPS, LEAPFROG_STEPS, MIDPOINT_STEPS (or STUDENT_STEPS for both) and the *_BATCH,
# *_LR, *_WARMUP knobs override them; VAE_HARD_PIXEL (default 0, the loss of every run quoted in the README;
# 5 makes the VAE keep 1-3 px findings: `llcm train vae --hard-pixel-weight`, README "The default model");
# EXTRACTOR (inception | filterbank), PER_CLASS (images per class and
# run in the evaluation), EVAL_FLAGS (more `llcm evaluate` flags, e.g. --no-memorization).
# OMP_NUM_THREADS=1 is the robust choice on a shared 2-core machine (two threads stall when another
# process holds a core).
#
# The gpu profile's step counts are what time limits of 1.5 min (VAE), 3 min (teacher) and 2 min per
# student (the two students side by side, so the same compute budget each) reached on an H100; fixed
# here so that a rerun follows the same trajectory. The midpoint student takes two teacher calls per
# step, hence fewer steps in the same time.
set -euo pipefail
RUN=${1:-runs/mini}
SCALE=${SCALE:-1}
steps() { python -c "import sys; print(max(2, int(round($1 * $SCALE))))"; }
case "${PROFILE:-cpu}" in
  cpu) V=(800 16 0) T=(700 64 3e-4 0) S=(300 300 32) ;;   # (steps batch warmup) (steps batch lr warmup) (leapfrog midpoint batch)
  gpu) V=(2650 64 100) T=(2290 256 4e-4 200) S=(804 694 128) ;;
  *) echo "PROFILE must be cpu or gpu" >&2; exit 2 ;;
esac
VAE_STEPS=${VAE_STEPS:-$(steps ${V[0]})}; VAE_BATCH=${VAE_BATCH:-${V[1]}}; VAE_WARMUP=${VAE_WARMUP:-${V[2]}}
TEACHER_STEPS=${TEACHER_STEPS:-$(steps ${T[0]})}; TEACHER_BATCH=${TEACHER_BATCH:-${T[1]}}
TEACHER_LR=${TEACHER_LR:-${T[2]}}; TEACHER_WARMUP=${TEACHER_WARMUP:-${T[3]}}
LEAPFROG_STEPS=${LEAPFROG_STEPS:-${STUDENT_STEPS:-$(steps ${S[0]})}}
MIDPOINT_STEPS=${MIDPOINT_STEPS:-${STUDENT_STEPS:-$(steps ${S[1]})}}
STUDENT_BATCH=${STUDENT_BATCH:-${S[2]}}
mkdir -p "$RUN"
SECONDS=0
stage() { echo "[recipe] $1 done at ${SECONDS}s" | tee -a "$RUN/timing.txt"; }
llcm data mini --out "$RUN/data"; stage data
llcm train vae --data "$RUN/data" --out "$RUN/vae" --steps "$VAE_STEPS" --batch "$VAE_BATCH" --warmup "$VAE_WARMUP" \
    --hard-pixel-weight "${VAE_HARD_PIXEL:-0}" --resume; stage vae
llcm encode --data "$RUN/data" --model "$RUN/vae/model" --out "$RUN/lat-train" --split train; stage encode
llcm train teacher --latents "$RUN/lat-train" --model "$RUN/vae/model" --out "$RUN/teacher" \
    --steps "$TEACHER_STEPS" --batch "$TEACHER_BATCH" --lr "$TEACHER_LR" --warmup "$TEACHER_WARMUP" --resume; stage teacher
for solver in leapfrog midpoint; do
  n=$LEAPFROG_STEPS; [ "$solver" = midpoint ] && n=$MIDPOINT_STEPS
  llcm distill --teacher "$RUN/teacher/model" --latents "$RUN/lat-train" --solver "$solver" \
      --out "$RUN/llcm-$solver" --steps "$n" --batch "$STUDENT_BATCH" --lr 2e-4 --w-min 2 --w-max 8 --resume
  stage "distill $solver"
done
llcm evaluate --data "$RUN/data" --out "$RUN/eval" --extractor "${EXTRACTOR:-inception}" --per-class "${PER_CLASS:-20}" ${EVAL_FLAGS:-} \
    --steps 1,2,4 --model "teacher=$RUN/teacher/model:ddim@50" \
    --model "lcm=$RUN/llcm-leapfrog/model" --model "llcm-midpoint=$RUN/llcm-midpoint/model"
stage evaluate
echo "recipe done in ${SECONDS}s: report in $RUN/eval/report.html"
