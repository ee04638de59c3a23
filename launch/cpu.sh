#!/usr/bin/env bash
# Train on CPU with N processes (gloo backend, DeepSpeed's CPU accelerator).
#
#   bash launch/cpu.sh [--dry-run] NPROC MODULE [ARGS...]
#   bash launch/cpu.sh 2 ds_longformer.pretrain --max_steps 3 ...
#
# The trainer picks ds_configs/cpu.json unless ARGS give --deepspeed_config. OMP_NUM_THREADS
# defaults to cores / NPROC: unset, every rank starts a thread per core and runs ~5x slower.
# --dry-run (or DRY_RUN=1) prints the command (stdout) instead of running it.
set -euo pipefail
DRY_RUN=${DRY_RUN:-0}
if [[ "${1:-}" == "--dry-run" ]]; then DRY_RUN=1; shift; fi
if [[ $# -lt 2 ]]; then
    echo "usage: bash $0 [--dry-run] NPROC MODULE [ARGS...]" >&2
    exit 2
fi
NPROC=$1 MODULE=$2
shift 2
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}
export DS_ACCELERATOR=cpu CUDA_VISIBLE_DEVICES=""  # CPU even on a GPU machine

cmd=(torchrun --standalone --nproc_per_node "$NPROC" -m "$MODULE" "$@")
line="OMP_NUM_THREADS=$OMP_NUM_THREADS $(printf '%q ' "${cmd[@]}")"
if [[ "$DRY_RUN" == 1 ]]; then echo "$line"; exit 0; fi
echo "+ $line" >&2
exec "${cmd[@]}"
