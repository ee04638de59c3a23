#!/usr/bin/env bash
# The offline quickstart under the deepspeed launcher, on whatever this machine has.
#
#   bash launch/quickstart.sh [--dry-run] [QUICKSTART ARGS...]
#   bash launch/quickstart.sh --max_seq_len 4096 --steps 200
#
# GPUs: the deepspeed launcher over all visible GPUs (CUDA_VISIBLE_DEVICES respected). No GPU: 2 CPU processes (gloo, DeepSpeed's
# CPU accelerator), OMP_NUM_THREADS = cores / 2 unless set. Both go through launch/multi_gpu.sh;
# --batch_size stays the documents per step of all ranks together, so results do not depend on N.
# --dry-run (or DRY_RUN=1) prints the command (stdout) instead of running it.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
DRY=()
if [[ "${1:-}" == "--dry-run" ]]; then DRY=(--dry-run); shift; fi

NGPUS=$(python -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [[ "$NGPUS" -gt 0 ]]; then
    exec bash "$HERE/multi_gpu.sh" "${DRY[@]}" "$NGPUS" ds_longformer.quickstart "$@"
fi
export DS_ACCELERATOR=cpu CUDA_VISIBLE_DEVICES=""
exec bash "$HERE/multi_gpu.sh" "${DRY[@]}" 2 ds_longformer.quickstart "$@"
