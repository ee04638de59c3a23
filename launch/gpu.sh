#!/usr/bin/env bash
# Train on one GPU (a plain single process: the trainer sets up a world of one).
#
#   bash launch/gpu.sh [--dry-run] MODULE [ARGS...]
#   bash launch/gpu.sh ds_longformer.classify --deepspeed_config zero2 --batch_size 16 ...
#
# Uses GPU 0 unless CUDA_VISIBLE_DEVICES says otherwise; the trainer picks ds_configs/zero2.json
# unless ARGS give --deepspeed_config. --dry-run (or DRY_RUN=1) prints the command.
set -euo pipefail
DRY_RUN=${DRY_RUN:-0}
if [[ "${1:-}" == "--dry-run" ]]; then DRY_RUN=1; shift; fi
if [[ $# -lt 1 ]]; then
    echo "usage: bash $0 [--dry-run] MODULE [ARGS...]" >&2
    exit 2
fi
MODULE=$1
shift
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}

cmd=(python -m "$MODULE" "$@")
line="CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES $(printf '%q ' "${cmd[@]}")"
if [[ "$DRY_RUN" == 1 ]]; then echo "$line"; exit 0; fi
echo "+ $line" >&2
exec "${cmd[@]}"
