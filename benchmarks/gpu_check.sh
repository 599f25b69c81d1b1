#!/usr/bin/env bash
# The GPU check, prepared to run in under 8 minutes on one GPU machine (16 cores, one large NVIDIA GPU):
#   1. RN50 224 px MMCL and MMCL+SSL training: steps/s and peak GPU memory, ours (loader in 12
#      processes, pinned, async copies, channels_last, bf16) against a bare loop on pre-decoded tensors
#      on the same GPU; then the same with torch.compile
#   2. loader samples/s at 224 px with 4, 8 and 16 loader processes against webdataset + DataLoader
#   3. evaluation of 10k images (and 50k for the memory) against a bare image-encoder loop
# From the repository root, with the venv active: bash benchmarks/gpu_check.sh [--dry-run]
# --dry-run runs every step tiny on the CPU (minutes on 2 cores): it checks the script, not the figures.
set -uo pipefail
cd "$(dirname "$0")/.."
export RAY_USAGE_STATS_ENABLED=0 DO_NOT_TRACK=1
if [[ "${1:-}" == "--dry-run" ]]; then
  train=(--dry-run) compiled=(--dry-run --compile) loader=(--samples 64 --batch 16 --processes 1 2) eval=(--dry-run)
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  train=(--batch 256 --steps 20) compiled=(--batch 256 --steps 20 --compile)
  loader=(--samples 4096 --batch 256 --processes 4 8 16 --repeats 1) eval=(--images 10000 --batch 500 --processes 16)
fi
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
# each step has its own time limit (7 min 40 s in all) and a failed step does not stop the others
step() { local limit=$1; shift; echo "== $*"; timeout "$limit" python "$@" || echo "!! exit $? (124: over ${limit} s)"; }
step 130 benchmarks/gpu_train.py "${train[@]}"
step 100 benchmarks/gpu_train.py "${compiled[@]}"
step 110 benchmarks/loader.py "${loader[@]}"
step 120 benchmarks/evaluate.py "${eval[@]}"
