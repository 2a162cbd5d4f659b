#!/usr/bin/env bash
# One-shot GPU check, about 8 minutes on one GPU; anyone with a GPU runs it as is, one line per figure:
#   1. an SD-1.5-size distillation step in bf16: time and peak memory, without and with gradient checkpointing
#      (bench/sd15_distill_step.py --compare);
#   2. 4-step generation at 512 px against its FLOP floor: SDPA, channels_last, torch.compile
#      (bench/gpu_generate.py), and the tiny default model's images/s;
#   3. the planner's estimate for the sd15 preset beside it (bench/sd15_distill_step.py --plan).
# --cpu-smoke shrinks every shape so the whole script runs on a CPU in a couple of minutes (figures meaningless):
# CI-style insurance that it still runs.
#   bash bench/gpu_check.sh                 on a GPU
#   bash bench/gpu_check.sh --cpu-smoke     anywhere
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--cpu-smoke" ]; then
  python bench/sd15_distill_step.py --smoke --compare
  python bench/gpu_generate.py --cpu-smoke --no-compile
  python bench/sd15_distill_step.py --smoke --plan --batch 128 --mixed-precision bf16 | grep -v '^{' 
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  python bench/sd15_distill_step.py --device cuda --dtype bf16 --adamw --compare
  python bench/gpu_generate.py --batch 8
  python bench/sd15_distill_step.py --plan --batch 128 --mixed-precision bf16 | grep -v '^{'
fi
